"""Real-text eval tasks (lm, recall): samples from document windows, NLL / KL / copy metrics through the runner
against plain model() references, resume, the markdown table, the plot and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gatekv.corpus import Document, load_corpus
from gatekv.eval import make_realtext_samples, run_eval
from gatekv.eval.config import EvalConfig
from gatekv.eval.realtext import RECALL_INSTRUCTION, score_target
from gatekv.models import char_tokenizer, tiny_model

DATA = Path(__file__).parent / "data" / "gpl3_excerpt.txt"
LENGTH, CONTINUATION, SPAN, CUE, WINDOW = 160, 24, 20, 4, 8


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def documents():
    return load_corpus([str(DATA)])


def _samples(task, tokenizer, documents, num_samples=4, seed_base=0):
    return make_realtext_samples(task, tokenizer, documents, LENGTH, num_samples, seed_base, CONTINUATION, SPAN, CUE,
                                 0.8, WINDOW)


# -- samples ------------------------------------------------------------------------------------------------------------


def test_lm_samples_are_windows_of_the_document(tokenizer, documents):
    samples = _samples("lm", tokenizer, documents, num_samples=6)
    text = documents[0].text
    assert samples == _samples("lm", tokenizer, documents, num_samples=6)
    assert _samples("lm", tokenizer, documents, num_samples=2, seed_base=4) == samples[4:]  # a seed's sample is fixed
    windows = {(s.document, s.offset) for s in samples}
    assert len(windows) == 6 and len({s.offset for s in samples}) == 6  # non-overlapping windows: distinct offsets
    offsets = sorted(s.offset for s in samples)
    assert all(b - a >= LENGTH + CONTINUATION for a, b in zip(offsets, offsets[1:]))
    for sample in samples:
        assert len(sample.context_ids) == LENGTH and len(sample.target_ids) == CONTINUATION and not sample.question_ids
        window = tokenizer.decode(sample.context_ids + sample.target_ids)
        assert window == text[sample.offset: sample.offset + LENGTH + CONTINUATION]  # the continuation follows verbatim
        assert sample.prefix_ids("query_aware") == sample.prefix_ids("query_agnostic") == sample.context_ids


def test_recall_span_is_verbatim_and_outside_the_recent_window(tokenizer, documents):
    lm = _samples("lm", tokenizer, documents, num_samples=6)
    for sample, same_window in zip(_samples("recall", tokenizer, documents, num_samples=6), lm):
        assert sample.context_ids == same_window.context_ids  # both tasks see the same context for a seed
        start = sample.meta["span_start"]
        cue = sample.context_ids[start: start + CUE]
        assert sample.context_ids[start + CUE: start + CUE + SPAN] == sample.target_ids and len(sample.target_ids) == SPAN
        assert start + CUE + SPAN <= int(0.8 * LENGTH) <= LENGTH - WINDOW  # far from the recent window
        assert sample.question_ids[-CUE:] == cue and tokenizer.decode(sample.question_ids[:-CUE]) == RECALL_INSTRUCTION
        assert tokenizer.decode(sample.target_ids) in tokenizer.decode(sample.context_ids)
        assert sample.prefix_ids("query_aware") == sample.context_ids + sample.question_ids
        assert sample.rest_ids("query_aware") == sample.target_ids
        assert sample.rest_ids("query_agnostic") == sample.question_ids + sample.target_ids


def test_samples_spread_over_documents_first(tokenizer):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    documents = [Document(f"files:{i}", "files", " ".join(words[(i + k) % len(words)] for k in range(400)))
                 for i in range(3)]
    samples = make_realtext_samples("lm", tokenizer, documents, 200, 5, continuation_tokens=16)
    assert len({s.document for s in samples[:3]}) == 3 and len({(s.document, s.offset) for s in samples}) == 5
    with pytest.raises(ValueError, match="fewer than num_samples=99"):
        make_realtext_samples("lm", tokenizer, documents, 200, 99, continuation_tokens=16)
    with pytest.raises(ValueError, match="does not fit"):
        make_realtext_samples("recall", tokenizer, documents, 200, 1, recall_span=180, window=8)
    with pytest.raises(ValueError, match="unknown real-text task"):
        make_realtext_samples("copy", tokenizer, documents, 200, 1)


def test_score_target_metrics():
    generator = torch.Generator().manual_seed(0)  # independent of the tests run before this one
    full = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64, generator=generator), -1)
    target = full.argmax(-1).tolist()
    same = score_target(full, target, full, "recall")
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["delta_nll"] == pytest.approx(0, abs=1e-12)
    assert same["copy"] == 1.0 and same["exact"] == 1.0 and same["top1"] == 1.0
    other = full.clone()
    other[2] = other[2].roll(1)  # position 2 now predicts something else (a flip keeps a middle argmax)
    scored = score_target(other, target, full, "recall")
    assert scored["copy"] == 2 / 5 and scored["exact"] == 0.0 and scored["top1"] == 4 / 5 and scored["kl"] > 0 and scored["delta_nll"] > 0
    manual = -(other.log_softmax(-1).gather(1, torch.tensor(target)[:, None])).mean()
    assert scored["nll"] == pytest.approx(float(manual), abs=1e-12)
    assert set(score_target(other, target, full, "lm")) == {"nll", "full_nll", "delta_nll", "kl"}


# -- runner ----------------------------------------------------------------------------------------------------------------


def _config(tmp_path, **changes) -> EvalConfig:
    from gatekv.config import from_dict

    data = {
        "model": "tiny:llama",
        "methods": [{"name": "full", "scorer": "full"},
                    {"name": "snapkv", "scorer": "snapkv", "allocators": ["uniform", "adakv"]},
                    {"name": "streaming", "scorer": "streaming_llm"}],
        "budgets": [0.3, 1.0],
        "tasks": ["lm", "recall"],
        "lengths": [LENGTH],
        "modes": ["query_agnostic", "query_aware"],
        "num_samples": 2,
        "corpus": [str(DATA)],
        "continuation_tokens": CONTINUATION,
        "recall_span": SPAN,
        "recall_cue": CUE,
        "window": WINDOW,
        "sinks": 2,
        "output": str(tmp_path / "eval"),
    }
    data.update(changes)
    return from_dict(EvalConfig, data)


def _manual_nll(model, ids: list[int], target_len: int, events=None) -> float:
    """Mean NLL of the last ``target_len`` tokens of ``ids``: one plain forward, or the masked reference of the
    evictions ``events`` (evicted keys masked out)."""
    input_ids = torch.tensor([ids[:-1]])
    if events is None:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[0]
    else:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from masked_reference import reference_logits

        logits = reference_logits(model, input_ids, torch.ones_like(input_ids), events)[0]
    logits = logits[-target_len:].double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[-target_len:])))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model, tokenizer):
    config = _config(tmp_path_factory.mktemp("realtext"))
    return config, run_eval(config, model=model, tokenizer=tokenizer, progress=False)


def test_runner_metrics_match_plain_references(finished, model, tokenizer, documents):
    config, results = finished
    cells = results.cells
    assert len(cells) == 2 * (1 + 2 * 3 * 2)  # (full + 2 modes x 3 settings x 2 budgets) per task
    for task in ("lm", "recall"):
        samples = _samples(task, tokenizer, documents, num_samples=2)
        full = cells[f"full|-|1|-|{task}|{LENGTH}"]
        for sample, record in zip(samples, full["samples"]):
            ids = sample.context_ids + sample.question_ids + sample.target_ids
            assert record["nll"] == pytest.approx(_manual_nll(model, ids, len(sample.target_ids)), abs=1e-5)
            assert record["kl"] == 0.0 and record["delta_nll"] == 0.0
        for key, entry in cells.items():
            if entry["cell"]["task"] != task or entry["cell"]["allocator"] == "-":
                continue
            assert set(entry["metrics"]) >= {"nll", "delta_nll", "kl"} and entry["n"] == 2
            for record, reference in zip(entry["samples"], full["samples"]):
                assert record["kl"] >= 0 and record["full_nll"] == pytest.approx(reference["nll"], abs=1e-9)
                assert record["delta_nll"] == pytest.approx(record["nll"] - reference["nll"], abs=1e-9)
                if entry["cell"]["budget"] == 1.0:  # keeps the whole prompt: the full cache's numbers
                    assert record["kl"] < 1e-6 and record["nll"] == pytest.approx(reference["nll"], abs=1e-5)
                    assert record.get("copy") == reference.get("copy") and record.get("top1") == reference.get("top1")
                else:
                    assert record["kv_ratio"] < 1
        compressed = [e for e in cells.values() if e["cell"]["task"] == task and e["cell"]["budget"] == 0.3]
        assert any(e["metrics"]["kl"] > 1e-4 for e in compressed)
    lm_modes = [cells[f"snapkv|adakv|0.3|{mode}|lm|{LENGTH}"]["samples"] for mode in ("query_agnostic", "query_aware")]
    assert [r["nll"] for r in lm_modes[0]] == [r["nll"] for r in lm_modes[1]]  # lm has no query: one computation


@pytest.mark.parametrize("task,mode", [("lm", "query_agnostic"), ("recall", "query_agnostic"), ("recall", "query_aware")])
def test_a_compressed_cell_matches_the_masked_reference(finished, model, tokenizer, documents, task, mode):
    """The runner's NLL of a SnapKV cell = a plain forward where the keys that compress() evicts are masked out."""
    from gatekv.compress import compress
    from gatekv.eval.realtext import full_logprobs

    config, results = finished
    sample = _samples(task, tokenizer, documents, num_samples=1)[0]
    record = results.cells[f"snapkv|uniform|0.3|{mode}|{task}|{LENGTH}"]["samples"][0]
    prefix, rest = sample.prefix_ids(mode), sample.rest_ids(mode)
    with torch.no_grad(), compress(model, "snapkv", budget=0.3, window=WINDOW, sinks=2, record=True) as session:
        cache = session.new_cache()
        model(input_ids=torch.tensor([prefix]), use_cache=True, cache=cache)
        model(input_ids=torch.tensor([rest[:-1]]), use_cache=True, cache=cache)
    ids = prefix + rest
    assert record["nll"] == pytest.approx(_manual_nll(model, ids, SPAN if task == "recall" else CONTINUATION,
                                                      session.stats.events), abs=1e-4)
    assert record["prompt_tokens"] == len(prefix)
    assert record["kept_per_head"] == pytest.approx(float(session.stats.events[-1].kept_tokens.double().mean()))
    assert full_logprobs(model, sample).shape[0] == len(sample.target_ids)


def test_shared_prefill_equals_one_session_per_cell(tmp_path, finished, model, tokenizer, monkeypatch):
    from gatekv.eval import runner

    config, shared = finished
    monkeypatch.setattr(runner, "_shares_realtext_prefill", lambda *args: False)
    alone = run_eval(_config(tmp_path, budgets=[0.3], tasks=["recall"], num_samples=1), model=model,
                     tokenizer=tokenizer, progress=False)
    assert len(alone.cells) == 1 + 2 * 3
    for key, entry in alone.cells.items():
        mine = shared.cells[key]["samples"]
        for a, b in zip(mine, entry["samples"]):
            assert a["nll"] == pytest.approx(b["nll"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-5), key
            assert a.get("copy") == b.get("copy") and a["kv_ratio"] == pytest.approx(b["kv_ratio"])


def test_realtext_eval_resumes_to_identical_cells(tmp_path, finished, model, tokenizer, monkeypatch):
    from gatekv.eval import realtext

    config, results = finished
    resumed = _config(tmp_path, output=str(tmp_path / "resumed"))
    path = resumed.output_dir / "results.json"
    path.parent.mkdir(parents=True)
    document = json.loads((config.output_dir / "results.json").read_text())
    keys = sorted(document["cells"])
    crashed = keys[3]
    entry = document["cells"].pop(crashed)  # crashed after its first sample ...
    document["partial"] = {crashed: [{"index": 0, **entry["samples"][0]}]}
    dropped = document["cells"].pop(keys[7])  # ... and a cell not started
    path.write_text(json.dumps(document))
    calls = []
    full_logprobs = realtext.full_logprobs
    monkeypatch.setattr(realtext, "full_logprobs", lambda *args: calls.append(1) or full_logprobs(*args))
    again = run_eval(resumed, model=model, tokenizer=tokenizer, progress=False)
    same_task = crashed.split("|")[4] == keys[7].split("|")[4]
    assert len(calls) == (2 if same_task else 3)  # one full-cache forward per sample that still had cells to run

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert again.cells.keys() == results.cells.keys() and not again.partial
    for key, original in ((crashed, entry), (keys[7], dropped)):
        mine = strip(again.cells[key]["samples"])
        for a, b in zip(mine, strip(original["samples"])):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-9) if isinstance(b[k], float)
                                                else a[k] == b[k] for k in b), key
    changed = _config(tmp_path, output=str(tmp_path / "resumed"), recall_span=SPAN + 1)
    with pytest.raises(ValueError, match="recall_span"):
        run_eval(changed, model=model, tokenizer=tokenizer, progress=False)


def test_results_record_the_corpus_documents_and_refuse_another_set(tmp_path, finished, documents, model, tokenizer):
    """The samples are windows of the documents installed here: results.json names them, and a resume on a machine
    with another set of documents (e.g. a Debian doc package missing) is refused, naming the documents."""
    config, results = finished
    assert results.config["corpus_documents"] == [d.name for d in documents]
    resumed = _config(tmp_path, output=str(tmp_path / "other-machine"))
    path = resumed.output_dir / "results.json"
    path.parent.mkdir(parents=True)
    document = json.loads((config.output_dir / "results.json").read_text())
    document["config"]["corpus_documents"] = document["config"]["corpus_documents"] + ["gnu-info:bash"]
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"missing here: gnu-info:bash; new here: none"):
        run_eval(resumed, model=model, tokenizer=tokenizer, progress=False)


def test_markdown_plot_and_card_show_the_realtext_metrics(tmp_path, finished, model):
    from gatekv.eval.report import add_to_model_card
    from gatekv.heads import Adapter, build_heads

    config, results = finished
    table = (config.output_dir / "results.md").read_text()
    assert f"### query-agnostic, {LENGTH} tokens: real text" in table and f"### query-aware, {LENGTH} tokens: real text" in table
    header = "| method | allocator | budget | lm NLL | lm Δ NLL | lm KL | recall NLL | recall Δ NLL | recall KL | recall copy | recall exact | recall top-1 |"
    assert header in table and "Accuracy (" not in table
    full_row = next(line for line in table.splitlines() if line.startswith("| full | - | full |"))
    columns = [c.strip() for c in full_row.strip("|").split("|")]
    assert columns[4:6] == ["-", "-"] and columns[7:9] == ["-", "-"] and float(columns[3]) > 0  # no Δ / KL of itself
    assert "| snapkv | adakv | 30% | " in table and "lower is better" in table
    png = (config.output_dir / "accuracy_vs_budget.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    Adapter(build_heads("retaining_head", model, hidden=8), base_model="tiny:llama", target="cis").save_pretrained(tmp_path / "a")
    add_to_model_card(tmp_path / "a", config.output_dir, "gatekv eval realtext.yaml")
    assert header in (tmp_path / "a" / "README.md").read_text()


def test_mixed_accuracy_and_realtext_tasks(tmp_path, model, tokenizer):
    from gatekv.eval.results import Cell

    config = _config(tmp_path, tasks=["niah_single", "lm"], lengths=[600], modes=["query_agnostic"], budgets=[0.3],
                     num_samples=1, max_new_tokens=3, methods=[{"name": "full", "scorer": "full"},
                                                            {"name": "tova", "scorer": "tova"}])
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert len(results.cells) == 4
    table = (config.output_dir / "results.md").read_text()
    assert "| tova | uniform | 30% | " in table and "Accuracy (" in table and "lm KL" in table
    lm_cell = Cell("tova", "uniform", 0.3, "query_agnostic", "lm", 600)
    assert results.accuracy(lm_cell) is None and results.cells[lm_cell.key]["metrics"]["nll"] > 0
    assert results.accuracy(Cell("tova", "uniform", 0.3, "query_agnostic", "niah_single", 600)) in (0.0, 1.0)


def test_realtext_config_bad_input(tmp_path):
    for change, message in [
        ({"tasks": ["lm", "lm"]}, "duplicates"),
        ({"recall_region": 1.5}, "recall_region must be in"),
        ({"continuation_tokens": 0}, "continuation_tokens must be >= 1"),
        ({"corpus": []}, "corpus must name"),
    ]:
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, **change)
    with pytest.warns(UserWarning, match="training corpus"):
        _config(tmp_path, corpus="python-docs")


def test_realtext_too_long_for_the_model(tmp_path, model, tokenizer):
    config = _config(tmp_path, lengths=[4090], tasks=["lm"], num_samples=1)
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings 4096"):
        run_eval(config, model=model, tokenizer=tokenizer, progress=False)


# -- oracle -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,mode", [("lm", "query_agnostic"), ("recall", "query_agnostic"), ("recall", "query_aware")])
def test_oracle_keeps_the_top_of_the_targets_own_label(model, tokenizer, documents, task, mode):
    """The oracle's kept tokens per head = sinks + recent window + the top of the CIS label from the queries after the
    prefix (which equals the column maximum of a plain q.k over those rows and the GQA group)."""
    from gatekv.compress import compress
    from gatekv.eval.oracle import OracleScorer, oracle_labels

    sample = _samples(task, tokenizer, documents, num_samples=1)[0]
    prefix, rest = sample.prefix_ids(mode), sample.rest_ids(mode)
    labels = oracle_labels(model, sample, mode)
    assert len(labels) == model.config.num_hidden_layers and labels[0].shape == (1, 2, len(prefix))
    # layer 0's label from a plain forward: the queries/keys of the first attention layer, RoPE applied by hand
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured = {}
    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_hook(lambda mod, args, kwargs, out: captured.update(kwargs=kwargs, args=args),
                                             with_kwargs=True)
    ids = prefix + rest[:-1]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
        handle.remove()
        hidden = captured["kwargs"].get("hidden_states", captured["args"][0] if captured["args"] else None)
        cos, sin = captured["kwargs"]["position_embeddings"]
        shape = (1, len(ids), -1, attention.head_dim)
        q = attention.q_proj(hidden).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        logits = q[:, :, len(prefix):] @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)
        logits = logits * attention.scaling
        causal = torch.arange(len(ids))[None, :] > torch.arange(len(prefix), len(ids))[:, None]
        logits = logits.masked_fill(causal, float("-inf"))[..., : len(prefix)]
        naive = logits.view(1, k.shape[1], -1, logits.shape[2], len(prefix)).amax(dim=(2, 3))
    torch.testing.assert_close(labels[0], naive, atol=1e-4, rtol=1e-4)

    with torch.no_grad(), compress(model, OracleScorer().set_labels(labels), budget=0.3, window=WINDOW, sinks=2,
                                   record=True) as session:
        model(input_ids=torch.tensor([prefix]), use_cache=True, cache=session.new_cache())
    event = session.stats.events[-1]
    budget = int(session.stats.budget_tokens[0])
    for layer, kept in enumerate(event.kept_positions):
        for head in range(kept.shape[1]):
            got = set(kept[0, head][kept[0, head] >= 0].tolist())
            protected = set(range(2)) | set(range(len(prefix) - WINDOW, len(prefix)))
            middle = torch.arange(2, len(prefix) - WINDOW)
            order = labels[layer][0, head, middle].argsort(descending=True)
            expected = protected | set(middle[order[: budget - len(protected)]].tolist())
            assert got == expected, (layer, head)


def test_oracle_cells_in_the_runner(tmp_path, model, tokenizer, documents):
    """An ``oracle`` method runs on the real-text tasks only (its cells for an accuracy task are not in the grid); its
    NLL equals the masked reference of the oracle's own evictions."""
    from gatekv.compress import compress
    from gatekv.eval.oracle import OracleScorer, oracle_labels

    methods = [{"name": "full", "scorer": "full"}, {"name": "oracle", "scorer": "oracle", "allocators": ["uniform", "adakv"]},
               {"name": "snapkv", "scorer": "snapkv"}]
    config = _config(tmp_path, methods=methods, budgets=[0.3], modes=["query_agnostic"], num_samples=2)
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert len(results.cells) == 2 * (1 + 3)
    for task in ("lm", "recall"):
        cell = results.cells[f"oracle|uniform|0.3|query_agnostic|{task}|{LENGTH}"]
        for sample, record in zip(_samples(task, tokenizer, documents, num_samples=2), cell["samples"]):
            prefix, rest = sample.prefix_ids("query_agnostic"), sample.rest_ids("query_agnostic")
            scorer = OracleScorer().set_labels(oracle_labels(model, sample, "query_agnostic"))
            with torch.no_grad(), compress(model, scorer, budget=0.3, window=WINDOW, sinks=2, record=True) as session:
                cache = session.new_cache()
                model(input_ids=torch.tensor([prefix]), use_cache=True, cache=cache)
            manual = _manual_nll(model, prefix + rest, len(sample.target_ids), session.stats.events)
            assert record["nll"] == pytest.approx(manual, abs=1e-4)
    assert "| oracle | uniform | 30% | " in (config.output_dir / "results.md").read_text()
    mixed = _config(tmp_path, methods=methods, budgets=[0.3], tasks=["niah_single", "lm"], lengths=[600],
                    modes=["query_agnostic"], num_samples=1, max_new_tokens=2, output=str(tmp_path / "mixed"))
    keys = run_eval(mixed, model=model, tokenizer=tokenizer, progress=False).cells.keys()
    assert not any(k.startswith("oracle|") and "|niah_single|" in k for k in keys)
    assert any(k.startswith("oracle|") and "|lm|" in k for k in keys)


def test_oracle_config_errors(tmp_path):
    with pytest.raises(ValueError, match="the oracle scores the real-text tasks"):
        _config(tmp_path, tasks=["niah_single"], methods=[{"name": "o", "scorer": "oracle"}])
    with pytest.raises(ValueError, match="the oracle takes no options"):
        _config(tmp_path, methods=[{"name": "o", "scorer": "oracle", "options": {"kernel_size": 3}}])
    with pytest.raises(ValueError, match="valid: full, oracle, "):
        _config(tmp_path, methods=[{"name": "o", "scorer": "oracel"}])
