"""Data: formats, chat template and prompt/response split, length limits and their counts, bad input, batching,
the resumable loader, and the offline synthetic generator."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datasets", reason="needs the train extra: pip install 'gatekv[train]'")
import torch

from gatekv.training.config import DataConfig
from gatekv.training.data import (
    EpochBatchSampler,
    Sample,
    StatefulBatchLoader,
    collate,
    length_sorted_batches,
    load_records,
    prepare_samples,
    split_train_val,
)
from gatekv.models import char_tokenizer
from gatekv.training import synthetic


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(tmp_path, tokenizer, records, **options):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = DataConfig(path=str(path), **options)
    return prepare_samples(load_records(config), tokenizer, config)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_sharegpt_last_paragraph_split(tmp_path, tokenizer):
    record = {"messages": [{"role": "user", "content": "Context here.\n\nWhat is it?"},
                           {"role": "assistant", "content": "An answer."},
                           {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]}
    (sample,), stats = prepare(tmp_path, tokenizer, [record])
    prompt = decode(tokenizer, sample.input_ids[: sample.prompt_length])
    response = decode(tokenizer, sample.input_ids[sample.prompt_length :])
    assert prompt == "<|im_start|>user\nContext here."
    assert response.startswith("\n\nWhat is it?<|im_end|>") and response.endswith("No.<|im_end|>\n")
    assert stats.used == 1 and stats.records == 1


def test_conversations_from_value_and_first_user_turn(tmp_path, tokenizer):
    record = {"conversations": [{"from": "human", "value": "Doc.\n\nQ?"}, {"from": "gpt", "value": "A."}]}
    (sample,), _ = prepare(tmp_path, tokenizer, [record], prompt_split="first_user_turn")
    assert decode(tokenizer, sample.input_ids[: sample.prompt_length]) == "<|im_start|>user\nDoc.\n\nQ?"


def test_alpaca_puts_the_instruction_after_the_input(tmp_path, tokenizer):
    record = {"instruction": "Summarise.", "input": "A long text.", "output": "Short."}
    (sample,), _ = prepare(tmp_path, tokenizer, [record])
    assert decode(tokenizer, sample.input_ids[: sample.prompt_length]) == "<|im_start|>user\nA long text."
    assert "Summarise." in decode(tokenizer, sample.input_ids[sample.prompt_length :])


def test_plain_text_fraction(tmp_path, tokenizer):
    (sample,), _ = prepare(tmp_path, tokenizer, [{"text": "abcdefghij" * 4}], plain_prompt_fraction=0.75)
    assert sample.length == 40 and sample.prompt_length == 30


def test_truncate_and_skip_are_counted(tmp_path, tokenizer):
    records = [{"text": "x" * 100}, {"text": "y" * 10}]
    samples, stats = prepare(tmp_path, tokenizer, records, max_length=50)
    assert [s.length for s in samples] == [50, 10] and stats.truncated == 1
    samples, stats = prepare(tmp_path, tokenizer, records, max_length=50, overlong="skip")
    assert [s.length for s in samples] == [10] and stats.skipped_overlong == 1
    assert "1 overlong" in stats.summary()


def test_truncation_that_leaves_no_response_is_skipped(tmp_path, tokenizer):
    records = [{"messages": [{"role": "user", "content": "c" * 80 + "\n\nq?"}, {"role": "assistant", "content": "a"}]},
               {"messages": [{"role": "user", "content": "short\n\nq?"}, {"role": "assistant", "content": "a"}]}]
    samples, stats = prepare(tmp_path, tokenizer, records, max_length=60)
    assert len(samples) == 1 and stats.skipped_no_response == 1


def test_no_usable_samples_is_an_error_with_counts(tmp_path, tokenizer):
    records = [{"messages": [{"role": "user", "content": "only a question"}]}, {"messages": "garbage"}]
    with pytest.raises(ValueError, match=r"no usable samples .*2 malformed.*needs a user and an assistant turn"):
        prepare(tmp_path, tokenizer, records)


def test_missing_column_is_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"column\(s\) \['output'\] missing"):
        prepare(tmp_path, tokenizer, [{"instruction": "x"}], format="alpaca")
    with pytest.raises(ValueError, match="cannot tell the format"):
        prepare(tmp_path, tokenizer, [{"body": "x"}])
    with pytest.raises(ValueError, match="text_column: column 'body' missing"):
        prepare(tmp_path, tokenizer, [{"text": "x"}], format="plain", text_column="body")


def test_missing_path_and_parquet(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="data.path: .* does not exist"):
        load_records(DataConfig(path=str(tmp_path / "nope.jsonl")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["hello world, hello", "another line of text"]}), tmp_path / "d.parquet")
    samples, _ = prepare_samples(load_records(DataConfig(path=str(tmp_path / "d.parquet"))), tokenizer,
                                 DataConfig(path=str(tmp_path / "d.parquet")))
    assert len(samples) == 2


def test_collate_pads_right_and_batches_sort_by_length():
    samples = [Sample(torch.arange(5), 3), Sample(torch.arange(2), 1), Sample(torch.arange(9), 4)]
    batch = collate(samples, pad_id=7)
    assert batch["input_ids"][1].tolist() == [0, 1, 7, 7, 7, 7, 7, 7, 7]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 9]
    assert batch["prompt_lengths"].tolist() == [3, 1, 4]
    assert length_sorted_batches(samples, 2) == [[1, 0], [2]]


def test_split_is_seeded_and_capped():
    samples = [Sample(torch.arange(i + 2), 1) for i in range(20)]
    config = DataConfig(path="x", val_fraction=0.5, val_max_samples=3, max_samples=10)
    train, val = split_train_val(samples, config, seed=1)
    assert (len(train), len(val)) == (7, 3)
    again = split_train_val(samples, config, seed=1)
    assert [s.length for s in again[0]] == [s.length for s in train]


def _drain(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch["lengths"].tolist())
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("stop", [2, 3])  # mid-epoch, and exactly at the end of an epoch (3 batches)
def test_stateful_loader_resumes_with_the_next_batch(stop):
    samples = [Sample(torch.arange(n), 1) for n in (3, 4, 5, 6, 7, 8)]
    reference = StatefulBatchLoader(samples, 2, 0, seed=5)
    expected = _drain(reference) + _drain(reference)  # two epochs
    first = StatefulBatchLoader(samples, 2, 0, seed=5)
    seen = _drain(first, stop)
    state = first.state_dict()
    resumed = StatefulBatchLoader(samples, 2, 0, seed=5)
    resumed.load_state_dict(state)
    seen += _drain(resumed)
    if stop == 3:  # the state was taken at the epoch's end: the resumed iteration is the next epoch
        assert seen == expected
    else:
        seen += _drain(resumed)
        assert seen == expected


def test_sampler_refuses_state_of_other_data():
    sampler = EpochBatchSampler([[0], [1]], seed=0)
    with pytest.raises(ValueError, match="batches per epoch"):
        sampler.load_state_dict({"epoch": 0, "consumed": 1, "num_batches": 5})


def test_synthetic_samples_are_deterministic_and_hold_their_facts(tokenizer):
    count = synthetic.tokenizer_counter(tokenizer)
    a = synthetic.make_samples(6, count, min_tokens=200, max_tokens=400)
    b = synthetic.make_samples(6, count, min_tokens=200, max_tokens=400)
    assert [s.to_record() for s in a] == [s.to_record() for s in b]
    for sample in a:
        context = sample.messages[0]["content"].rsplit("\n\n", 1)[0]
        assert 1 <= len(sample.facts) <= 4
        assert all(fact["statement"] in context for fact in sample.facts)
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        assert all(any(a == f["answer"] for f in sample.facts) for a in answers)
        assert sample.context_tokens <= 400 + 40
    assert a[0].seed == synthetic.TRAIN_SEED_BASE


def test_synthetic_train_and_eval_text_are_disjoint():
    train, evaluation = synthetic.topic_keys("train"), synthetic.topic_keys("eval")
    assert train and evaluation and not set(train) & set(evaluation)
    assert not set(synthetic.sentences("train")) & set(synthetic.sentences("eval"))
    with pytest.raises(ValueError, match="training seeds must be >="):
        synthetic.make_samples(1, synthetic.char_estimate, seed_base=5)


def test_prepare_data_script_writes_usable_jsonl(tmp_path, tokenizer):
    import subprocess
    import sys

    from _training_helpers import REPO

    out = tmp_path / "d.jsonl"
    subprocess.run([sys.executable, str(REPO / "train" / "prepare_data.py"), "--tokenizer", "char", "--out", str(out),
                    "--num-samples", "3", "--min-tokens", "100", "--max-tokens", "150"], check=True, capture_output=True)
    samples, stats = prepare_samples(load_records(DataConfig(path=str(out))), tokenizer, DataConfig(path=str(out)))
    assert stats.used == 3 and all(s.length > s.prompt_length for s in samples)


def test_prepare_data_script_writes_task_chats(tmp_path, tokenizer):
    """--task: a gatekv eval task's training split as chats (context + question, then the answer), whose prompt split
    at the last paragraph is the context."""
    import json
    import subprocess
    import sys

    from _training_helpers import REPO

    out = tmp_path / "t.jsonl"
    subprocess.run([sys.executable, str(REPO / "train" / "prepare_data.py"), "--tokenizer", "char", "--task",
                    "niah_multikey", "--out", str(out), "--num-samples", "3", "--min-tokens", "300",
                    "--max-tokens", "400"], check=True, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and {r["meta"]["part"] for r in records} == {"niah_multikey"}
    for r in records:
        user, assistant = r["messages"]
        assert assistant["content"] == r["meta"]["answers"][0] and assistant["content"] in user["content"]
        assert r["meta"]["seed"] >= synthetic.TRAIN_SEED_BASE and r["meta"]["source"] == "pydoc_data.topics[train]"
    config = DataConfig(path=str(out), prompt_split="last_paragraph")
    samples, stats = prepare_samples(load_records(config), tokenizer, config)
    assert stats.used == 3 and all(s.length > s.prompt_length for s in samples)


def test_processes_share_each_epoch_without_overlap():
    batches = [[i] for i in range(7)]
    shares = [EpochBatchSampler(batches, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        got = [list(iter(s)) for s in shares]
        assert len(got[0]) == len(got[1]) == 3  # the 7th batch of the epoch is dropped: equal step counts
        assert not {b[0] for b in got[0]} & {b[0] for b in got[1]}
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        EpochBatchSampler([[0], [1]], seed=0, world_size=4)
