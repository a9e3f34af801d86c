"""The issue-14 training mix: real-document continuation records next to chats in one JSONL (mixed format, split at
``prompt_chars``), and gatekv.training.mix (counts, determinism, train-side seeds, windows verbatim from documents)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datasets", reason="needs the train extra: pip install 'gatekv[train]'")

from gatekv.training import synthetic
from gatekv.training.config import DataConfig
from gatekv.training.data import load_records, prepare_samples
from gatekv.training.mix import MixConfig, make_mix
from gatekv.models import char_tokenizer

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the barn. " * 12).strip()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _prepare(tmp_path, tokenizer, records, **options):
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = DataConfig(path=str(path), **options)
    return prepare_samples(load_records(config), tokenizer, config)


def test_mixed_records_split_per_record(tmp_path, tokenizer):
    text = "Context of a document." + " And its continuation."
    chat = {"messages": [{"role": "user", "content": "Facts.\n\nQuestion?"}, {"role": "assistant", "content": "A."}],
            "text": None, "prompt_chars": None}
    doc = {"messages": None, "text": text, "prompt_chars": len("Context of a document.")}
    samples, stats = _prepare(tmp_path, tokenizer, [chat, doc])
    assert stats.used == 2
    chat_sample, doc_sample = samples
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(chat_sample.input_ids[: chat_sample.prompt_length]).endswith("Facts.")
    # the document: no chat template, prompt = exactly the first prompt_chars characters
    assert decode(doc_sample.input_ids[: doc_sample.prompt_length]) == "Context of a document."
    assert decode(doc_sample.input_ids[doc_sample.prompt_length :]) == " And its continuation."


@pytest.mark.parametrize("bad", [0, 10_000, True])
def test_bad_prompt_chars_is_malformed(tmp_path, tokenizer, bad):
    good = {"messages": None, "text": "Some text here.", "prompt_chars": 4}
    broken = {"messages": None, "text": "Other text here.", "prompt_chars": bad}
    samples, stats = _prepare(tmp_path, tokenizer, [good, broken])
    assert stats.used == 1 and stats.skipped_malformed == 1
    assert "prompt_chars" in stats.problems[0]


def _corpus(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for i, word in enumerate(("alpha", "beta", "gamma")):
        (directory / f"doc{i}.txt").write_text(" ".join(f"{word}{j} said the {word} line number {j}." for j in range(300)))
    return directory


def test_make_mix_counts_windows_and_determinism(tmp_path, tokenizer):
    config = MixConfig(num_samples=10, shares=(0.5, 0.3, 0.2), min_tokens=64, max_tokens=256, continuation=16,
                       corpus=str(_corpus(tmp_path)), part_max_tokens=(200, 128, None))
    assert [config.part_max(i) for i in range(3)] == [200, 128, 256]
    assert config.counts() == (5, 3, 2)
    records, summary = make_mix(tokenizer, config)
    again, _ = make_mix(tokenizer, config)
    assert records == again
    parts = [r["meta"]["part"] for r in records]
    assert sorted(parts) == ["docs"] * 5 + ["multi"] * 2 + ["qa"] * 3
    assert (summary["docs"], summary["qa"], summary["multi"]) == (5, 3, 2)
    texts = {p.name: p.read_text() for p in (tmp_path / "corpus").iterdir()}
    for record in records:
        if record["meta"]["part"] != "docs":
            assert record["text"] is None and record["messages"][0]["role"] == "user"
            assert record["meta"]["seed"] >= synthetic.TRAIN_SEED_BASE
            continue
        source = texts[record["meta"]["source"].rsplit("/", 1)[-1]]
        assert record["text"] in source  # a verbatim window
        context = tokenizer(record["text"][: record["prompt_chars"]], add_special_tokens=False)["input_ids"]
        assert 64 <= len(context) <= 200
    multi = [r for r in records if r["meta"]["part"] == "multi"]
    # multi-needle: 4-8 facts, every one asked in its own user turn
    assert all(sum(m["role"] == "user" for m in r["messages"]) >= 4 for r in multi)
    samples, stats = _prepare(tmp_path, tokenizer, records, max_length=1024)
    assert stats.used == 10 and stats.skipped_malformed == 0


@pytest.mark.parametrize("field,value,match", [
    ("shares", (1.0, -0.1, 0.0), "shares"), ("seed", 5, "seed must be >="), ("min_tokens", 8, "min_tokens"),
    ("multi_facts", (3, 2), "multi_facts"), ("continuation", 0, "continuation"),
    ("part_max_tokens", (100, None, None), "part_max_tokens"),
])
def test_mix_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        MixConfig(**{field: value})


def test_mix_summary_goes_to_the_training_summary(tmp_path):
    from gatekv.training.runner import _data_mix

    data = tmp_path / "mix.jsonl"
    data.write_text("")
    assert _data_mix(str(data)) is None  # no summary next to the data: nothing recorded
    (tmp_path / "mix.jsonl.mix.json").write_text(json.dumps({"docs": 3, "qa": 2, "multi": 1, "config": {"x": 1}}))
    assert _data_mix(str(data)) == {"docs": 3, "qa": 2, "multi": 1}
    (tmp_path / "mix.jsonl.mix.json").write_text("{broken")
    assert _data_mix(str(data)) is None


def test_mix_summary_in_a_data_directory_is_not_read_as_data(tmp_path, tokenizer):
    directory = tmp_path / "data"
    directory.mkdir()
    record = {"messages": None, "text": "Context of a document. And more.", "prompt_chars": 22}
    (directory / "mix.jsonl").write_text(json.dumps(record) + "\n")
    (directory / "mix.jsonl.mix.json").write_text(json.dumps({"docs": 1, "qa": 0, "multi": 0}))
    config = DataConfig(path=str(directory))
    samples, stats = prepare_samples(load_records(config), tokenizer, config)
    assert stats.records == 1 and stats.used == 1
