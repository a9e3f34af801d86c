"""Evaluation: task generators, metrics, the runner (JSON / markdown / plot, resume) and the suite loaders."""

from __future__ import annotations

import json

import pytest
import torch

from gatekv.eval import TASKS, EvalConfig, Haystack, load_eval_config, make_task_sample, run_eval, score_answer
from gatekv.eval.config import MethodConfig
from gatekv.eval.results import EvalResults
from gatekv.eval.runner import grid
from gatekv.models import char_tokenizer, tiny_model
from gatekv.training.synthetic import TRAIN_SEED_BASE, sentences


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


# -- generators ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_generator_is_deterministic_and_embeds_the_answers(task, tokenizer):
    a = make_task_sample(task, tokenizer, 1500, seed=11)
    b = make_task_sample(task, tokenizer, 1500, seed=11)
    c = make_task_sample(task, tokenizer, 1500, seed=12)
    assert a == b and a.context != c.context
    assert a.context_tokens <= 1500 and a.context_tokens > 1500 * 0.6
    assert len(tokenizer(a.context, add_special_tokens=False)["input_ids"]) == a.context_tokens
    for answer in a.answers:
        assert answer in a.context or task == "cwe"
    if task == "cwe":  # the three answers are strictly the most frequent words of the list
        words = [w for w in a.context.split() if w.isalpha() and w.islower()]
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts, key=counts.get, reverse=True)
        assert set(top[:3]) == set(a.answers) and counts[top[2]] > counts[top[3]]
    if task == "vt":
        assert f"VAR {a.answers[0]} = " in a.context and all(f"VAR {n} = VAR " in a.context for n in a.answers[1:])
    if task.startswith("niah_multi") or task == "vt":
        assert a.metric == "all" or task == "niah_multikey"


def test_haystack_is_held_out_from_training_text(tokenizer):
    train = set(sentences("train"))
    sample = make_task_sample("niah_single", tokenizer, 1000, seed=3)
    used = [s for s in Haystack.default().sentences if s in sample.context]
    assert used and not any(s in train for s in used)
    with pytest.raises(ValueError, match="belong to training"):
        make_task_sample("niah_single", tokenizer, 1000, seed=TRAIN_SEED_BASE)


def test_training_split_of_a_task_is_disjoint_from_evaluation(tokenizer):
    """split='train' (fine-tuning data of a task): training seeds only, the training haystack, never an evaluation
    sentence; the same seed gives the same sample."""
    sample = make_task_sample("niah_multikey", tokenizer, 600, seed=TRAIN_SEED_BASE + 7, split="train")
    assert sample == make_task_sample("niah_multikey", tokenizer, 600, seed=TRAIN_SEED_BASE + 7, split="train")
    held_out = set(sentences("eval"))
    used = [s for s in sentences("train") if s in sample.context]
    assert used and not any(s in sample.context for s in held_out if s not in set(sentences("train")))
    assert sample.meta == {"haystack": "pydoc_data.topics[train]", "split": "train"} and sample.answers[0] in sample.context
    with pytest.raises(ValueError, match="training seeds must be ints >= "):
        make_task_sample("niah_multikey", tokenizer, 600, seed=3, split="train")
    with pytest.raises(ValueError, match="split must be 'eval' or 'train'"):
        make_task_sample("niah_multikey", tokenizer, 600, seed=3, split="test")


def test_generator_bad_input(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'needle'.*niah_single"):
        make_task_sample("needle", tokenizer, 1000, seed=0)
    with pytest.raises(ValueError, match="length must be an int >= 128"):
        make_task_sample("qa", tokenizer, 64, seed=0)
    (tmp_path / "short.txt").write_text("Too short. Really.")
    with pytest.raises(ValueError, match="usable sentences; at least 20"):
        Haystack.from_files([tmp_path / "short.txt"])
    with pytest.raises(ValueError, match="haystack file not found"):
        Haystack.from_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="0 usable sentences"):
        Haystack.from_files([tmp_path / "empty.txt"])


def test_local_text_files_make_a_haystack(tokenizer, tmp_path):
    text = " ".join(f"Sentence about the garden path that winds along the river bank, version {chr(65 + i % 26)}." for i in range(60))
    (tmp_path / "a.txt").write_text(text)
    haystack = Haystack.from_files([tmp_path / "a.txt"])
    sample = make_task_sample("niah_single", tokenizer, 800, seed=1, haystack=haystack)
    assert "garden path" in sample.context and sample.answers[0] in sample.context


# -- metrics ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction,answers,metric,expected",
    [
        ("The code is 48213.", ["48213"], "contains", 1.0),
        ("The code is 148213.", ["48213"], "contains", 0.0),  # part of a longer number
        ("The code is 4821", ["48213"], "contains", 0.0),  # a lost digit
        ("It is in LISBON", ["Lisbon"], "contains", 1.0),
        ("a catalog", ["cat"], "contains", 0.0),
        ("", ["x"], "contains", 0.0),
        ("12345 and 67890", ["12345", "67890", "11111", "22222"], "all", 0.5),
        ("  Banjo. ", ["banjo"], "exact", 1.0),
        ("banjo player", ["banjo"], "exact", 0.0),
    ],
)
def test_metric_cases(prediction, answers, metric, expected):
    assert score_answer(prediction, answers, metric) == expected


def test_metric_bad_input():
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        score_answer("x", ["x"], "f1")
    with pytest.raises(ValueError, match="answers must not be empty"):
        score_answer("x", [], "contains")
    with pytest.raises(ValueError, match="must not be empty"):
        score_answer("x", ["  "], "contains")


# -- runner -------------------------------------------------------------------------------------------------------------------


def _config(tmp_path, **changes) -> EvalConfig:
    data = {
        "model": "tiny:llama",
        "methods": [{"name": "full", "scorer": "full"},
                    {"name": "snapkv", "scorer": "snapkv", "allocators": ["uniform", "adakv"]},
                    {"name": "streaming", "scorer": "streaming_llm"}],
        "budgets": [0.2, 0.5],
        "tasks": ["niah_single", "qa"],
        "lengths": [600],
        "num_samples": 2,
        "window": 8,
        "sinks": 2,
        "max_new_tokens": 3,
        "output": str(tmp_path / "eval"),
    }
    data.update(changes)
    from gatekv.config import from_dict

    return from_dict(EvalConfig, data)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_eval_on_a_tiny_model_writes_json_markdown_and_plot(tmp_path, model, tokenizer):
    config = _config(tmp_path)
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    out = config.output_dir
    document = json.loads((out / "results.json").read_text())
    expected = len(grid(config, [("niah_single", 600), ("qa", 600)]))
    assert len(document["cells"]) == expected == 2 + 2 * (2 * 2 + 2)
    for entry in document["cells"].values():
        assert entry["n"] == 2 and 0 <= entry["accuracy"] <= 1 and len(entry["samples"]) == 2
        assert all(s["prediction"] is not None for s in entry["samples"])
    compressed = [e for e in document["cells"].values() if e["cell"]["allocator"] != "-"]
    assert all(0 < s["kv_ratio"] < 1 for e in compressed for s in e["samples"])
    table = (out / "results.md").read_text()
    assert "### query-agnostic, 600 tokens" in table and "| snapkv | adakv | 20% |" in table and "| full | - | full |" in table
    png = (out / "accuracy_vs_budget.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert results.cells.keys() == document["cells"].keys()


def test_eval_resumes_and_skips_finished_cells(tmp_path, model, tokenizer, monkeypatch):
    config = _config(tmp_path, methods=[{"name": "full", "scorer": "full"}, {"name": "tova", "scorer": "tova"}],
                     tasks=["niah_single"])
    run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    path = config.output_dir / "results.json"
    document = json.loads(path.read_text())
    dropped = sorted(document["cells"])[-1]
    del document["cells"][dropped]
    path.write_text(json.dumps(document))
    calls = _count_answers(monkeypatch)
    run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert len(calls) == 2  # only the dropped cell's two samples ran again
    assert dropped in json.loads(path.read_text())["cells"]


def _count_answers(monkeypatch) -> list:
    """Record every answer computed (one per ``answer`` call, one per setting of ``answer_settings``)."""
    from gatekv.inference import GateKV

    calls = []
    answer, answer_settings = GateKV.answer, GateKV.answer_settings

    def one(self, *args, **kwargs):
        calls.append(kwargs.get("budget"))
        return answer(self, *args, **kwargs)

    def many(self, context, question, settings, **kwargs):
        calls.extend(s["budget"] for s in settings)
        return answer_settings(self, context, question, settings, **kwargs)

    monkeypatch.setattr(GateKV, "answer", one)
    monkeypatch.setattr(GateKV, "answer_settings", many)
    return calls


def test_shared_prefill_cells_equal_one_prefill_per_cell(tmp_path, model, tokenizer, monkeypatch):
    from gatekv.eval import runner

    shared = run_eval(_config(tmp_path / "shared"), model=model, tokenizer=tokenizer, progress=False)
    monkeypatch.setattr(runner, "_shareable", lambda *args: False)
    alone = run_eval(_config(tmp_path / "alone"), model=model, tokenizer=tokenizer, progress=False)
    assert shared.cells.keys() == alone.cells.keys()
    for key, entry in alone.cells.items():
        mine = shared.cells[key]
        assert [s["prediction"] for s in mine["samples"]] == [s["prediction"] for s in entry["samples"]], key
        assert [s["kv_ratio"] for s in mine["samples"]] == [s["kv_ratio"] for s in entry["samples"]], key
        assert mine["accuracy"] == entry["accuracy"]


def test_eval_resumes_a_shared_cell_from_its_finished_samples(tmp_path, model, tokenizer, monkeypatch):
    config = _config(tmp_path, methods=[{"name": "snapkv", "scorer": "snapkv"}], tasks=["niah_single"], budgets=[0.3],
                     num_samples=3)
    run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    path = config.output_dir / "results.json"
    document = json.loads(path.read_text())
    (key, entry), = document["cells"].items()
    document["cells"] = {}
    document["partial"] = {key: [{"index": i, **r} for i, r in enumerate(entry["samples"][:2])]}  # crashed at sample 3
    path.write_text(json.dumps(document))
    calls = _count_answers(monkeypatch)
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert calls == [0.3]  # only the third sample ran
    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert strip(results.cells[key]["samples"]) == strip(entry["samples"]) and not results.partial
    assert "partial" not in json.loads(path.read_text())


def test_eval_bad_input(tmp_path, model, tokenizer):
    config = _config(tmp_path)
    config.output_dir.mkdir(parents=True)
    (config.output_dir / "results.json").write_text('{"version": 1, "cells": {"a": ')
    with pytest.raises(ValueError, match="results.json is corrupted"):
        run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    (config.output_dir / "results.json").write_text(json.dumps({"version": 1, "config": {"num_samples": 9}, "cells": {}}))
    with pytest.raises(ValueError, match="other settings.*num_samples: 9 \\(file\\) vs 2 \\(config\\)"):
        run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    too_long = _config(tmp_path / "b", lengths=[5000])
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings 4096"):
        run_eval(too_long, model=model, tokenizer=tokenizer, progress=False)
    for change, message in [
        ({"tasks": ["needle"]}, "unknown task 'needle'"),
        ({"methods": [{"name": "x", "scorer": "snapkvv"}]}, "unknown scorer 'snapkvv'"),
        ({"methods": [{"name": "x", "scorer": "snapkv", "allocators": ["fair"]}]}, "unknown allocator 'fair'"),
        ({"methods": [{"name": "x", "scorer": "snapkv", "adapter": "a"}]}, "exactly one of scorer or adapter"),
        ({"budgets": [0.0]}, "not a fraction"),
        ({"seed_base": TRAIN_SEED_BASE}, "training data"),
        ({"num_samples": "ten"}, "num_samples: expected int"),
    ]:
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, **change)


def test_eval_configs_in_the_repo_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs" / "eval").glob("*.yaml"))
    assert configs
    for path in configs:
        config = load_eval_config(path)
        assert config.methods and config.budgets


# -- public suites ----------------------------------------------------------------------------------------------------------


def test_suite_loaders_read_a_local_parquet_fixture(tmp_path):
    pytest.importorskip("datasets")
    import pandas as pd

    from gatekv.eval.loaders import load_suite

    pd.DataFrame({"context": ["Some long text. The answer is Oslo.", "Other text."], "input": ["Where?", "What?"],
                  "answers": [["Oslo"], ["nothing"]], "length": [8, 2]}).to_parquet(tmp_path / "lb.parquet")
    samples = load_suite("longbench", str(tmp_path / "lb.parquet"))
    assert [s.answers for s in samples] == [["Oslo"], ["nothing"]] and samples[0].question == "Where?"
    pd.DataFrame({"input": ["Context here.\n\nWhat is the magic number?"], "outputs": [["123", "456"]]}).to_parquet(
        tmp_path / "ruler.parquet")
    ruler = load_suite("ruler", str(tmp_path / "ruler.parquet"))
    assert ruler[0].context == "Context here." and ruler[0].question == "What is the magic number?"
    assert ruler[0].metric == "all"
    pd.DataFrame({"context": ["c"], "input": ["q"], "answer": ["a"]}).to_parquet(tmp_path / "inf.parquet")
    assert load_suite("infinitebench", str(tmp_path / "inf.parquet"))[0].answers == ["a"]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        load_suite("infinitebench", str(tmp_path / "lb.parquet"))
    with pytest.raises(ValueError, match="unknown suite kind"):
        load_suite("mmlu", str(tmp_path / "lb.parquet"))


def test_eval_with_a_suite_column(tmp_path, model, tokenizer):
    pytest.importorskip("datasets")
    import pandas as pd

    context = "The river is wide. " * 20 + "The password is swordfish."
    pd.DataFrame({"context": [context], "input": ["What is the password?"], "answers": [["swordfish"]]}).to_parquet(
        tmp_path / "lb.parquet")
    config = _config(tmp_path, tasks=[], methods=[{"name": "full", "scorer": "full"}, {"name": "knorm", "scorer": "knorm"}],
                     suites=[{"name": "lb-local", "kind": "longbench", "source": str(tmp_path / "lb.parquet")}])
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert {entry["cell"]["task"] for entry in results.cells.values()} == {"lb-local"}
    assert "native tokens" in (config.output_dir / "results.md").read_text()


def test_eval_methods_with_allocator_options_and_a_merger(tmp_path, model, tokenizer):
    config = _config(tmp_path, tasks=["niah_single"], budgets=[0.3], num_samples=1, methods=[
        {"name": "full", "scorer": "full"},
        {"name": "ems", "scorer": "ems", "merge": "ems"},
        {"name": "ldkv", "scorer": "defensivekv", "allocators": ["global"], "allocator_options": {"global": {"floor": 0.2}}},
    ])
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert len(results.cells) == 3
    with pytest.raises(ValueError, match="allocator_options for \\['adakv'\\], which are not in allocators"):
        _config(tmp_path, methods=[{"name": "x", "scorer": "snapkv", "allocator_options": {"adakv": {"alpha": 0.2}}}])
    with pytest.raises(ValueError, match="unknown merge 'blend'"):
        _config(tmp_path, methods=[{"name": "x", "scorer": "snapkv", "merge": "blend"}])


def test_eval_adapter_in_a_rank_mix(tmp_path, model, tokenizer):
    """``options: {rank_mix: {adapter: w, scorer: w'}}`` runs the adapter's heads blended with the scorer: the same
    answers as GateKV with that mix; its options are checked at load time, naming the method."""
    from gatekv import GateKV
    from gatekv.heads import Adapter, build_heads

    torch.manual_seed(2)
    Adapter(build_heads("retaining_head", model, hidden=8), base_model="tiny:llama", target="cis").save_pretrained(
        tmp_path / "a")
    mix = {"weights": {"adapter": 0.7, "defensivekv": 0.3}, "quota": {"adapter": 0.5}}
    config = _config(tmp_path, tasks=["niah_single"], budgets=[0.3], num_samples=2, methods=[
        {"name": "full", "scorer": "full"},
        {"name": "mixed", "adapter": str(tmp_path / "a"), "allocators": ["defensive_budget"],
         "options": {"rank_mix": mix, "pool_kernel": 3}}])
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    entry = results.cells["mixed|defensive_budget|0.3|query_agnostic|niah_single|600"]
    from gatekv.eval.tasks import make_task_samples
    from gatekv.inference import prompt_ids

    head_tokens = prompt_ids(tokenizer, "", "")[0].shape[1]
    samples = make_task_samples("niah_single", tokenizer, 600, 2, config.seed_base, None, head_tokens)
    assert [r["seed"] for r in entry["samples"]] == [s.seed for s in samples]
    adapter = Adapter.from_pretrained(tmp_path / "a")
    adapter.heads.set_pooling(3)
    kv = GateKV(model, tokenizer, adapter=adapter, rank_mix=mix, allocator="defensive_budget", budget=0.3, window=8,
                sinks=2)
    for sample, record in zip(samples, entry["samples"]):
        answer = kv.answer(sample.context, sample.question, query_aware=False, max_new_tokens=3)
        assert answer.text == record["prediction"]
    for options, message in [({"rank_mix": {"snapkv": 1.0, "knorm": 1.0}}, "must weigh 'adapter'"),
                             ({"rank_mix": {"adapter": 1.0, "snapkvv": 1.0}}, "unknown scorer 'snapkvv'"),
                             ({"rank_mix": {"adapter": 1.0, "knorm": -1}}, r"weights\['knorm'\] must be a number"),
                             ({"rank_mix": {"weights": {"adapter": 1, "knorm": 1}, "quota": {"tova": 0.1}}},
                              "rank_mix: quota must map"),
                             ({"rank_mix": {"weights": {"adapter": 1, "knorm": 1}, "combine": "mean"}},
                              "combine must be"),
                             ({"rank_mix": {"weights": {"adapter": 1, "knorm": 1}, "top": 1}}, r"got \['top'\]"),
                             ({"recency": "off"}, "recency must be true or false"),
                             ({"heads_dtype": "half"}, "heads_dtype must be one of"),
                             ({"kernel_size": 3}, r"options \['kernel_size'\] do not apply to an adapter")]:
        with pytest.raises(ValueError, match=f"method 'm': .*{message}"):
            _config(tmp_path, methods=[{"name": "m", "adapter": str(tmp_path / "a"), "options": options}])
    recent = tmp_path / "recent"
    Adapter(build_heads("retaining_head", model, hidden=8, recency_buckets=8), base_model="tiny:llama",
            target="cis").save_pretrained(recent)
    off = _config(tmp_path, methods=[{"name": "off", "adapter": str(recent), "options": {"recency": False}},
                                     {"name": "on", "adapter": str(recent)},
                                     {"name": "mix", "adapter": str(recent),
                                      "options": {"recency": False, "heads_dtype": "bfloat16",
                                                  "rank_mix": {"adapter": 1.0, "knorm": 1.0}}}])
    from gatekv.eval.runner import _wrappers

    wrappers = _wrappers(model, tokenizer, off)
    assert wrappers["off"].scorer.use_recency is False and wrappers["on"].scorer.use_recency is True
    assert wrappers["mix"].scorer.members["adapter"].use_recency is False  # the heads inside the rank mix
    assert next(wrappers["mix"].scorer.members["adapter"].parameters()).dtype == torch.bfloat16
    assert next(wrappers["on"].scorer.parameters()).dtype == torch.float32


def test_a_cell_added_on_resume_gets_every_sample_in_order(tmp_path, model, tokenizer):
    base = dict(tasks=["niah_single"], budgets=[0.3], num_samples=3)
    first = _config(tmp_path, methods=[{"name": "snapkv", "scorer": "snapkv"}], **base)
    run_eval(first, model=model, tokenizer=tokenizer, progress=False)
    path = first.output_dir / "results.json"
    document = json.loads(path.read_text())
    (key, entry), = document["cells"].items()
    document["cells"] = {}
    document["partial"] = {key: [{"index": 0, **entry["samples"][0]}]}
    path.write_text(json.dumps(document))
    both = _config(tmp_path, methods=[{"name": "snapkv", "scorer": "snapkv"}, {"name": "tova", "scorer": "tova"}], **base)
    resumed = run_eval(both, model=model, tokenizer=tokenizer, progress=False)
    alone = run_eval(_config(tmp_path / "alone", methods=[{"name": "tova", "scorer": "tova"}], **base), model=model,
                     tokenizer=tokenizer, progress=False)
    tova_key = key.replace("snapkv", "tova")
    assert [s["seed"] for s in resumed.cells[tova_key]["samples"]] == [0, 1, 2]
    assert [s["prediction"] for s in resumed.cells[tova_key]["samples"]] == [s["prediction"] for s in alone.cells[tova_key]["samples"]]
    assert [s["seed"] for s in resumed.cells[key]["samples"]] == [0, 1, 2]


def test_eval_tables_go_into_an_adapter_model_card(tmp_path, model):
    from safetensors.torch import load_file

    from gatekv.eval.report import add_to_model_card
    from gatekv.heads import Adapter, build_heads

    Adapter(build_heads("retaining_head", model, hidden=8), base_model="tiny:llama", target="cis").save_pretrained(tmp_path / "a")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="run the evaluation first"):
        add_to_model_card(tmp_path / "a", tmp_path / "missing", "gatekv eval x.yaml")
    for name, table in (("needle", "| heads | 0.98 |"), ("suite", "| heads | 0.70 |")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.md").write_text(table + "\n")
        add_to_model_card(tmp_path / "a", tmp_path / name, f"gatekv eval {name}.yaml")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Evaluation" in card and "| heads | 0.98 |" in card and "| heads | 0.70 |" in card
    assert "Command: `gatekv eval suite.yaml`" in card
    loaded = Adapter.from_pretrained(str(tmp_path / "a"))
    assert sorted(loaded.evaluation["tables"]) == ["needle", "suite"]
    reloaded = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(torch.equal(weights[k], reloaded[k]) for k in weights)


def test_a_budget_dependent_rank_mix_runs_one_prefill_per_cell(tmp_path, model, tokenizer, monkeypatch):
    """A rank mix with ``quota_prompt`` scores with the step's budget, so its cells are not put on a shared prefill
    (whose forks take several budgets): each cell's answers are GateKV's at that budget."""
    from gatekv import GateKV
    from gatekv.eval import runner
    from gatekv.heads import Adapter, build_heads

    torch.manual_seed(2)
    Adapter(build_heads("retaining_head", model, hidden=8), base_model="tiny:llama", target="cis").save_pretrained(
        tmp_path / "a")
    mix = {"weights": {"adapter": 0.5, "knorm": 0.5}, "quota": {"adapter": 0.5}, "quota_prompt": {"adapter": 0.1}}
    config = _config(tmp_path, tasks=["niah_single"], budgets=[0.3, 0.5], num_samples=2, methods=[
        {"name": "mixed", "adapter": str(tmp_path / "a"), "options": {"rank_mix": mix}}])
    wrappers = runner._wrappers(model, tokenizer, config)
    from gatekv.eval.results import Cell

    cell = Cell("mixed", "uniform", 0.3, "query_agnostic", "niah_single", 600)
    assert not runner._shareable(config, config.methods[0], cell, wrappers["mixed"])
    calls = _count_answers(monkeypatch)
    results = run_eval(config, model=model, tokenizer=tokenizer, progress=False)
    assert sorted(calls) == [0.3, 0.3, 0.5, 0.5]  # one prefill per cell and sample
    from gatekv.eval.tasks import make_task_samples
    from gatekv.inference import prompt_ids

    head_tokens = prompt_ids(tokenizer, "", "")[0].shape[1]
    samples = make_task_samples("niah_single", tokenizer, 600, 2, config.seed_base, None, head_tokens)
    for budget in (0.3, 0.5):
        entry = results.cells[f"mixed|uniform|{budget}|query_agnostic|niah_single|600"]
        kv = GateKV(model, tokenizer, adapter=str(tmp_path / "a"), rank_mix=mix, budget=budget, window=8, sinks=2)
        for sample, record in zip(samples, entry["samples"]):
            answer = kv.answer(sample.context, sample.question, query_aware=False, max_new_tokens=3)
            assert answer.text == record["prediction"]
