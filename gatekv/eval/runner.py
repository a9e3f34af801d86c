"""``run_eval(config)``: every cell (method, allocator, budget, mode, task, length) over the same samples.

Output directory (``config.output``)::

    results.json             every finished cell with per-sample predictions and scores (written atomically after
                             each cell, so a crash loses no finished cell; a rerun resumes from it)
    results.md               tables: one per (mode, length), rows = method / allocator / budget, columns = tasks
                             (accuracy tasks), and one per (mode, length) of the real-text tasks' metrics
    accuracy_vs_budget.png   mean accuracy over tasks vs budget, one line per method and allocator; one more panel
                             per real-text metric (lm NLL / KL, recall NLL / KL / copy / exact)

Trained adapters and training-free scorers go through the same path (:class:`gatekv.GateKV`): same prompts, same
allocators, same compacted cache. The full cache runs once per (task, length) and is the reference row.
Query-agnostic one-shot cells share one prefill per sample (:func:`gatekv.compress.shared_prefill`: every scorer
scores the same forward, each (scorer, allocator, budget) compacts its own copy): the answers are those of one
prefill per cell, several times faster; their progress is saved per sample. Cells whose allocator observes the
prefill (CAKE, D2O), LoRA adapters and query-aware cells run one prefill each.

Real-text tasks (``lm``, ``recall``; :mod:`gatekv.eval.realtext`) are scored teacher-forced, not by generation:
per sample, the full cache's log-probabilities come from one forward and serve every setting (its KL and Δ NLL);
the compressed settings of a mode share one prefill of that mode's prompt (query-aware cells too: the prompt then
ends with the instruction), each (scorer, allocator, budget) a compacted fork that the target is teacher-forced on.
Their cells hold ``metrics`` (means over samples) instead of ``accuracy``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatekv.eval.config import EvalConfig, MethodConfig
from gatekv.eval.metrics import score_answer
from gatekv.eval.realtext import REALTEXT_METRICS, REALTEXT_TASKS
from gatekv.eval.tasks import EvalSample, Haystack, make_task_samples
from gatekv.io import atomic_write, atomic_write_text

__all__ = ["Cell", "EvalResults", "add_to_model_card", "format_markdown", "format_realtext_markdown", "plot_results",
           "run_eval"]

RESULTS_VERSION = 1
SOLVED = 0.8
"""A task counts as solved by the full cache at this accuracy; ratios to the full cache use solved tasks only."""
_COMPARABLE = ("model", "dtype", "num_samples", "seed_base", "haystack_files", "window", "sinks", "prefill",
               "chunk_size", "max_new_tokens")
_COMPARABLE_REALTEXT = {"corpus": "gnu-info", "continuation_tokens": 128, "recall_span": 96, "recall_cue": 8,
                        "recall_region": 0.8}
"""Settings that change real-text samples, with the value a results file written before they existed implies."""


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    method: str
    allocator: str
    budget: float
    mode: str
    task: str
    length: int

    @property
    def key(self) -> str:
        return f"{self.method}|{self.allocator}|{self.budget:g}|{self.mode}|{self.task}|{self.length}"


@dataclass
class EvalResults:
    """What a run produced (also what ``results.json`` holds)."""

    config: dict
    cells: dict[str, dict] = field(default_factory=dict)
    """``Cell.key`` -> ``{"cell": {...}, "accuracy": float, "n": int, "seconds": float, "samples": [...]}``; real-text
    cells have ``"metrics": {name: mean}`` (``REALTEXT_METRICS``) instead of ``accuracy``."""
    partial: dict[str, list[dict]] = field(default_factory=dict)
    """``Cell.key`` -> per-sample records of a cell still running (shared-prefill cells advance sample by sample)."""

    def accuracy(self, cell: Cell) -> float | None:
        entry = self.cells.get(cell.key)
        return None if entry is None else entry.get("accuracy")

    def to_json(self) -> str:
        document = {"version": RESULTS_VERSION, "config": self.config, "cells": self.cells}
        if self.partial:
            document["partial"] = self.partial
        return json.dumps(document, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path) -> "EvalResults":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is corrupted ({error}); move it away to start over, or restore it to resume"
            ) from None
        if not isinstance(document, dict) or document.get("version") != RESULTS_VERSION or not isinstance(document.get("cells"), dict):
            raise ValueError(f"{path} is not a gatekv eval results file (version {RESULTS_VERSION}); move it away to start over")
        partial = document.get("partial") or {}
        if not isinstance(partial, dict):
            raise ValueError(f"{path}: 'partial' must be a mapping of cell keys to sample records")
        return cls(document.get("config") or {}, document["cells"], partial)


def grid(config: EvalConfig, task_lengths: list[tuple[str, int]]) -> list[Cell]:
    """Every cell of the run, the full cache first (it is the reference)."""
    cells = []
    for method in config.methods:
        for task, length in task_lengths:
            if method.is_full:
                cells.append(Cell(method.name, "-", 1.0, "-", task, length))
                continue
            for mode in config.modes:
                for allocator in method.allocators:
                    for budget in config.budgets:
                        cells.append(Cell(method.name, allocator, budget, mode, task, length))
    return sorted(cells, key=lambda c: (c.allocator != "-", c.task, c.length))


def _check_resume(existing: EvalResults, config: dict, path: Path) -> None:
    differing = [k for k in _COMPARABLE if existing.config.get(k) != config.get(k)]
    if any(t in REALTEXT_TASKS for t in config.get("tasks", [])):
        differing += [k for k, old in _COMPARABLE_REALTEXT.items() if existing.config.get(k, old) != config.get(k)]
    if differing:
        details = "; ".join(f"{k}: {existing.config.get(k)!r} (file) vs {config.get(k)!r} (config)" for k in differing)
        raise ValueError(f"{path} was made with other settings ({details}); use another output or resume: false")


def _samples(config: EvalConfig, tokenizer, head_tokens: int) -> dict[tuple[str, int], list[EvalSample]]:
    from gatekv.eval.loaders import load_suite

    haystack = Haystack.from_files(config.haystack_files) if config.haystack_files else None
    out = {}
    if config.realtext_tasks:
        from gatekv.corpus import load_corpus
        from gatekv.eval.realtext import make_realtext_samples

        documents = load_corpus(config.corpus)
        for task in config.realtext_tasks:
            for length in config.lengths:
                out[(task, length)] = make_realtext_samples(
                    task, tokenizer, documents, length, config.num_samples, config.seed_base,
                    config.continuation_tokens, config.recall_span, config.recall_cue, config.recall_region,
                    config.window)
    for task in config.tasks:
        if task in REALTEXT_TASKS:
            continue
        for length in config.lengths:
            out[(task, length)] = make_task_samples(task, tokenizer, length, config.num_samples, config.seed_base,
                                                    haystack, head_tokens)
    for suite in config.suites:
        samples = load_suite(suite.kind, suite.source, suite.split, suite.config_name, suite.max_samples or config.num_samples)
        out[(suite.name, 0)] = samples
    return out


def _check_lengths(model, config: EvalConfig, samples: dict, question_room: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    for (task, length), task_samples in samples.items():
        if task in REALTEXT_TASKS:
            longest = max(len(s.context_ids) + len(s.question_ids) + len(s.target_ids) for s in task_samples)
            if longest > limit:
                raise ValueError(f"lengths: {length} tokens (+ {task}'s question and target: {longest} in all) exceed "
                                 f"the model's max_position_embeddings {limit}")
            continue
        if length and length + question_room + config.max_new_tokens > limit:
            raise ValueError(
                f"lengths: {length} tokens (+ question and {config.max_new_tokens} new tokens) exceed the model's "
                f"max_position_embeddings {limit}"
            )


def _wrappers(model, tokenizer, config: EvalConfig) -> dict[str, object]:
    """One :class:`GateKV` per method (the full cache: no scorer)."""
    from gatekv.inference import GateKV

    out = {}
    for method in config.methods:
        common = dict(budget=config.budgets[0], allocator=_allocator(method, method.allocators[0]),
                      prefill=config.prefill, window=config.window, sinks=config.sinks, chunk_size=config.chunk_size)
        if method.merge is not None:
            from gatekv.merge import get_merger

            common["merge"] = get_merger(method.merge, **method.merge_options)
        if method.is_full:
            out[method.name] = GateKV(model, tokenizer)
        elif method.adapter is not None:
            kv = GateKV(model, tokenizer, adapter=method.adapter, **common)
            unknown = sorted(set(method.options) - {"pool_kernel"})
            if unknown:
                raise ValueError(f"method {method.name!r}: options {unknown} do not apply to an adapter (valid: pool_kernel)")
            if "pool_kernel" in method.options:
                kv.scorer.set_pooling(method.options["pool_kernel"])
            out[method.name] = kv
        else:
            from gatekv.scorers import get_scorer

            scorer = get_scorer(method.scorer, **method.options) if method.options else method.scorer
            out[method.name] = GateKV(model, tokenizer, scorer=scorer, **common)
    return out


def _record(sample: EvalSample, answer) -> dict:
    kept = None
    if answer.stats is not None and answer.stats.events:
        kept = float(answer.stats.events[-1].kept_tokens.double().mean())
    return {"seed": sample.seed, "score": score_answer(answer.text, sample.answers, sample.metric),
            "prediction": answer.text, "answers": sample.answers, "prompt_tokens": answer.prompt_tokens,
            "kept_per_head": kept, "kv_ratio": answer.kv_bytes / max(answer.full_kv_bytes, 1),
            "seconds": answer.seconds}


def _finish_cell(results: EvalResults, cell: Cell, records: list[dict], seconds: float) -> None:
    accuracy = sum(r["score"] for r in records) / len(records)
    results.cells[cell.key] = {"cell": cell.__dict__, "accuracy": accuracy, "n": len(records), "seconds": seconds,
                               "samples": records}
    results.partial.pop(cell.key, None)


def _shareable(config: EvalConfig, method: MethodConfig, cell: Cell, kv) -> bool:
    """Whether ``cell`` can run on a prefill shared with other cells: query-agnostic, one-shot, a compressing method
    whose allocator does not observe the prefill itself and whose adapter (if any) leaves the model unchanged."""
    from gatekv.allocators import get_allocator

    if method.is_full or cell.mode != "query_agnostic" or config.prefill != "one_shot":
        return False
    if kv.adapter is not None and kv.adapter.lora is not None:
        return False
    allocator = get_allocator(_allocator(method, cell.allocator))
    return not (getattr(allocator, "cascade", False) or getattr(allocator, "needs_window_attention", False))


def _run_shared(config, model, tokenizer, group, task_samples, wrappers, methods, results, json_path, bar) -> None:
    """Every cell of ``group`` (same task and length), sample by sample, on one prefill per sample
    (:meth:`GateKV.answer_settings`): the same answers as one prefill per cell. Progress is saved after each sample
    (``results.partial``), so a crash loses at most the sample in flight."""
    from gatekv.inference import GateKV

    runner = GateKV(model, tokenizer, window=config.window, sinks=config.sinks)
    scorers = {c.method: wrappers[c.method].scorer for c in group}
    settings = [dict(scorer=c.method, allocator=_allocator(methods[c.method], c.allocator), budget=c.budget,
                     merge=wrappers[c.method].compress_options.get("merge")) for c in group]
    def finished(cell) -> set[int]:
        return {r["index"] for r in results.partial.get(cell.key, [])}

    for index, sample in enumerate(task_samples):
        pending = [i for i, c in enumerate(group) if c.key not in results.cells and index not in finished(c)]
        if not pending:
            continue
        answers = runner.answer_settings(sample.context, sample.question, [settings[i] for i in pending],
                                         scorers={group[i].method: scorers[group[i].method] for i in pending},
                                         max_new_tokens=config.max_new_tokens)
        for i, answer in zip(pending, answers):
            results.partial.setdefault(group[i].key, []).append({"index": index, **_record(sample, answer)})
            bar.update(1)
        bar.set_postfix_str(f"shared prefill: {len(pending)} cells, {group[0].task} sample {index + 1}")
        for cell in group:
            if cell.key not in results.cells and len(finished(cell)) == len(task_samples):
                records = sorted(results.partial[cell.key], key=lambda r: r["index"])
                records = [{k: v for k, v in r.items() if k != "index"} for r in records]
                _finish_cell(results, cell, records, sum(r["seconds"] for r in records))
        atomic_write_text(json_path, results.to_json())


def _shares_realtext_prefill(config: EvalConfig, method: MethodConfig, cell: Cell, kv) -> bool:
    """Whether a real-text cell can be a fork of the shared prefill of its mode's prompt (as :func:`_shareable`, in
    either mode: a query-aware prompt is the context with the instruction, compressed as a whole)."""
    return _shareable(config, method, Cell(cell.method, cell.allocator, cell.budget, "query_agnostic", cell.task,
                                           cell.length), kv)


def _realtext_record(index: int, sample, metrics: dict, prompt_tokens: int, cache, stats, seconds: float,
                     model) -> dict:
    from gatekv.cache import full_cache_kv_bytes

    kept, kv_ratio = None, 1.0
    if stats is not None and stats.events:
        kept = float(stats.events[-1].kept_tokens.double().mean())
    if cache is not None:
        total = len(sample.context_ids) + len(sample.question_ids) + len(sample.target_ids) - 1
        dtype = next(model.parameters()).dtype
        kv_ratio = cache.kv_bytes() / max(full_cache_kv_bytes(model.config, 1, total, dtype), 1)
    return {"index": index, "seed": sample.seed, "document": sample.document, "offset": sample.offset, **metrics,
            "target_tokens": len(sample.target_ids), "prompt_tokens": prompt_tokens, "kept_per_head": kept,
            "kv_ratio": kv_ratio, "seconds": seconds}


def _run_realtext(config, model, group, task_samples, wrappers, methods, results, json_path, bar) -> None:
    """Every cell of ``group`` (one real-text task and length), sample by sample: the full cache's log-probabilities
    once per sample, then per mode one shared prefill of the mode's prompt forked per setting (cells that cannot
    share one run their own session). Progress is saved after each sample (``results.partial``)."""
    from gatekv.compress import shared_prefill
    from gatekv.eval.realtext import full_logprobs, score_target, target_logits
    from gatekv.models import cache_kwarg

    device = next(model.parameters()).device
    kwarg = cache_kwarg(model)

    def finished(cell) -> set[int]:
        return {r["index"] for r in results.partial.get(cell.key, [])}

    for index, sample in enumerate(task_samples):
        pending = [c for c in group if c.key not in results.cells and index not in finished(c)]
        if not pending:
            continue
        task = sample.task
        start = time.perf_counter()
        full = full_logprobs(model, sample)
        full_seconds = time.perf_counter() - start
        records: dict[str, dict] = {}
        computed: dict[tuple, dict] = {}  # lm: both modes compress the same prompt, computed once
        for cell in [c for c in pending if c.allocator == "-"]:
            metrics = score_target(full, sample.target_ids, full, task)
            metrics.update(kl=0.0, delta_nll=0.0)  # the reference itself (exactly, not up to rounding)
            records[cell.key] = _realtext_record(index, sample, metrics, len(sample.context_ids), None, None,
                                                 full_seconds, model)
        for mode in config.modes:
            cells = [c for c in pending if c.mode == mode]
            prefix, rest = sample.prefix_ids(mode), sample.rest_ids(mode)
            prefix_kind = "context" if len(prefix) == len(sample.context_ids) else "prompt"
            todo = []
            for cell in cells:
                memo = computed.get((prefix_kind, cell.method, cell.allocator, cell.budget))
                if memo is not None:
                    records[cell.key] = {**memo, "index": index}
                else:
                    todo.append(cell)
            prefix_t = torch.tensor([prefix], dtype=torch.long, device=device)
            together = [c for c in todo if _shares_realtext_prefill(config, methods[c.method], c, wrappers[c.method])]
            alone = [c for c in todo if c not in together]
            if together:
                scorers = {c.method: wrappers[c.method].scorer for c in together}
                with torch.no_grad(), shared_prefill(model, scorers, window=config.window, sinks=config.sinks,
                                                     reserve=wrappers[together[0].method].compress_options.get(
                                                         "reserve")) as shared:
                    begin = time.perf_counter()
                    last = shared.prefill(prefix_t)[0]
                    prefill_seconds = time.perf_counter() - begin
                    for cell in together:
                        begin = time.perf_counter()
                        cache, stats = shared.fork(cell.method, _allocator(methods[cell.method], cell.allocator),
                                                   cell.budget, wrappers[cell.method].compress_options.get("merge"))
                        logits = target_logits(model, cache, kwarg, last, rest, len(sample.target_ids))
                        metrics = score_target(logits, sample.target_ids, full, task)
                        seconds = prefill_seconds + time.perf_counter() - begin  # each is charged the prefill
                        records[cell.key] = _realtext_record(index, sample, metrics, len(prefix), cache, stats,
                                                             seconds, model)
            for cell in alone:
                kv = wrappers[cell.method]
                begin = time.perf_counter()
                with torch.no_grad(), kv.session(budget=cell.budget,
                                                 allocator=_allocator(methods[cell.method], cell.allocator)) as session:
                    cache = session.new_cache()
                    last = model(input_ids=prefix_t, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits[0, -1]
                    logits = target_logits(model, cache, kwarg, last, rest, len(sample.target_ids))
                    stats = session.stats
                metrics = score_target(logits, sample.target_ids, full, task)
                records[cell.key] = _realtext_record(index, sample, metrics, len(prefix), cache, stats,
                                                     time.perf_counter() - begin, model)
            for cell in todo:
                computed[(prefix_kind, cell.method, cell.allocator, cell.budget)] = records[cell.key]
        for cell in pending:
            results.partial.setdefault(cell.key, []).append(records[cell.key])
            bar.update(1)
        bar.set_postfix_str(f"{task}: {len(pending)} cells, sample {index + 1}")
        for cell in group:
            if cell.key not in results.cells and len(finished(cell)) == len(task_samples):
                rows = sorted(results.partial[cell.key], key=lambda r: r["index"])
                rows = [{k: v for k, v in r.items() if k != "index"} for r in rows]
                _finish_realtext_cell(results, cell, rows)
        atomic_write_text(json_path, results.to_json())


def _finish_realtext_cell(results: EvalResults, cell: Cell, records: list[dict]) -> None:
    metrics = {name: sum(r[name] for r in records) / len(records) for name in REALTEXT_METRICS[cell.task]}
    metrics["full_nll"] = sum(r["full_nll"] for r in records) / len(records)
    results.cells[cell.key] = {"cell": cell.__dict__, "metrics": metrics, "n": len(records),
                               "seconds": sum(r["seconds"] for r in records), "samples": records}
    results.partial.pop(cell.key, None)


def _allocator(method: MethodConfig, name: str):
    """The allocator ``name`` of ``method``: its name, or an instance when the method gives it options."""
    if name not in method.allocator_options:
        return name
    from gatekv.allocators import get_allocator

    return get_allocator(name, **method.allocator_options[name])


def run_eval(config: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> EvalResults:
    """Run (or resume) the grid of ``config``; writes results.json / results.md / the plot. Returns the results.

    model, tokenizer: an already-loaded model (default: load ``config.model``)
    """
    from tqdm.auto import tqdm

    from gatekv.config import to_dict
    from gatekv.inference import load_base_model, prompt_ids

    out = config.output_dir
    json_path = out / "results.json"
    plain = to_dict(config)
    results = EvalResults(plain)
    if json_path.exists():
        if not config.resume:
            raise ValueError(f"{json_path} exists and resume is false; use another output directory")
        results = EvalResults.load(json_path)
        _check_resume(results, plain, json_path)
        results.config = plain
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if model is None:
        model, tokenizer = load_base_model(config.model, dtype=getattr(torch, config.dtype), device=config.device)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with an explicitly passed model")
    head_ids, tail_ids = prompt_ids(tokenizer, "", "")
    samples = _samples(config, tokenizer, head_ids.shape[1])
    _check_lengths(model, config, samples, question_room=64)
    wrappers = _wrappers(model, tokenizer, config)
    methods = {m.name: m for m in config.methods}
    cells = grid(config, list(samples))
    todo = [c for c in cells if c.key not in results.cells]
    total = sum(len(samples[(c.task, c.length)]) - len(results.partial.get(c.key, [])) for c in todo)
    for key, records in results.partial.items():
        if any(not isinstance(r, dict) or not isinstance(r.get("index"), int) for r in records):
            raise ValueError(f"{json_path}: partial records of {key} lack their sample index; move the file away")
    bar = tqdm(total=total, desc="gatekv eval", unit="sample", disable=not progress, dynamic_ncols=True)
    realtext = [c for c in todo if c.task in REALTEXT_TASKS]
    todo = [c for c in todo if c.task not in REALTEXT_TASKS]
    shared = [c for c in todo if _shareable(config, methods[c.method], c, wrappers[c.method])]
    for cell in [c for c in todo if c.allocator == "-"] + [None] + [c for c in todo if c.allocator != "-"]:
        if cell is None:  # after the full-cache reference rows: cells sharing one prefill per sample
            for task, length in samples:
                group = [c for c in shared if (c.task, c.length) == (task, length)]
                if group:
                    _run_shared(config, model, tokenizer, group, samples[(task, length)], wrappers, methods, results,
                                json_path, bar)
            continue
        if cell in shared:
            continue
        kv = wrappers[cell.method]
        start = time.perf_counter()
        records = []
        for sample in samples[(cell.task, cell.length)]:
            overrides = {}
            if cell.allocator != "-":
                overrides = {"budget": cell.budget, "allocator": _allocator(methods[cell.method], cell.allocator)}
            answer = kv.answer(sample.context, sample.question, query_aware=cell.mode != "query_agnostic",
                               max_new_tokens=config.max_new_tokens, **overrides)
            records.append(_record(sample, answer))
            bar.update(1)
            bar.set_postfix_str(f"{cell.method}/{cell.allocator}/{cell.budget:g} {cell.task}")
        _finish_cell(results, cell, records, time.perf_counter() - start)
        atomic_write_text(json_path, results.to_json())  # a crash from here on loses no finished cell
    for task, length in samples:
        group = [c for c in realtext if (c.task, c.length) == (task, length)]
        if group:
            _run_realtext(config, model, group, samples[(task, length)], wrappers, methods, results, json_path, bar)
    bar.close()
    atomic_write_text(out / "results.md", format_markdown(results))
    try:
        plot_results(results, out / "accuracy_vs_budget.png")
    except ImportError as error:
        print(f"[gatekv eval] no plot: {error}")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------------


def _cells(results: EvalResults) -> list[Cell]:
    return [Cell(**entry["cell"]) for entry in results.cells.values()]


def format_markdown(results: EvalResults) -> str:
    """Tables per (mode, length): rows method / allocator / budget, columns tasks, mean, mean over solved tasks and
    its ratio to the full cache (solved = full-cache accuracy >= 0.8); then, for the real-text tasks, tables per
    (mode, length) of their metrics (:func:`format_realtext_markdown`)."""
    all_cells = _cells(results)
    cells = [c for c in all_cells if c.task not in REALTEXT_TASKS]
    lines = []
    if cells:
        lines += _accuracy_markdown(results, cells)
    if len(cells) != len(all_cells):
        lines += format_realtext_markdown(results).splitlines()
    return "\n".join(lines)


def _accuracy_markdown(results: EvalResults, cells: list[Cell]) -> list[str]:
    full = {(c.task, c.length): results.cells[c.key]["accuracy"] for c in cells if c.allocator == "-"}
    lengths = sorted({c.length for c in cells})
    modes = sorted({c.mode for c in cells if c.mode != "-"}) or ["-"]
    tasks = sorted({c.task for c in cells}, key=lambda t: (t.split(":")[0], t))
    n = {results.cells[c.key]["n"] for c in cells}
    lines = [f"Accuracy (n = {', '.join(map(str, sorted(n)))} samples per cell); 'solved' = tasks the full cache "
             f"answers with >= {SOLVED:.0%}; 'vs full' = mean over solved tasks / full cache's.", ""]
    for mode in modes:
        for length in lengths:
            row_cells = [c for c in cells if c.length == length and (c.mode == mode or c.allocator == "-")]
            if not row_cells:
                continue
            present = [t for t in tasks if any(c.task == t for c in row_cells)]
            solved = [t for t in present if full.get((t, length), 0) >= SOLVED]
            lines += [f"### {mode.replace('_', '-')}, {length or 'native'} tokens", ""]
            lines.append("| method | allocator | budget | " + " | ".join(present) + " | mean | solved | vs full |")
            lines.append("|" + "---|" * (len(present) + 6))
            rows = sorted({(c.method, c.allocator, c.budget) for c in row_cells},
                          key=lambda r: (r[1] != "-", r[0], r[1], r[2]))
            full_solved = sum(full[(t, length)] for t in solved) / len(solved) if solved else None
            for method, allocator, budget in rows:
                values = []
                for task in present:
                    key = Cell(method, allocator, budget, "-" if allocator == "-" else mode, task, length).key
                    values.append(results.cells[key]["accuracy"] if key in results.cells else None)
                done = [v for v in values if v is not None]
                solved_values = [v for t, v in zip(present, values) if t in solved and v is not None]
                mean_solved = sum(solved_values) / len(solved_values) if solved_values else None
                ratio = mean_solved / full_solved if mean_solved is not None and full_solved else None
                label = "full" if allocator == "-" else f"{budget:.0%}"
                text = " | ".join("" if v is None else f"{v:.2f}" for v in values)
                mean = f"{sum(done) / len(done):.2f}" if done else ""
                solved_text = "" if mean_solved is None else f"{mean_solved:.2f}"
                ratio_text = "" if ratio is None else f"{ratio:.2f}"
                lines.append(f"| {method} | {allocator} | {label} | {text} | {mean} | {solved_text} | {ratio_text} |")
            lines.append("")
    return lines


_METRIC_LABELS = {"nll": "NLL", "delta_nll": "Δ NLL", "kl": "KL", "copy": "copy", "exact": "exact", "top1": "top-1"}
_METRIC_TITLES = {"nll": "NLL per target token (nats)", "delta_nll": "Δ NLL vs full cache (nats)",
                  "kl": "KL(full || compressed) per token (nats)",
                  "copy": "span fraction copied before the first mistake", "exact": "whole span copied (fraction)",
                  "top1": "span tokens that are the argmax (teacher-forced)"}


def format_realtext_markdown(results: EvalResults) -> str:
    """Real-text tables per (mode, length): rows method / allocator / budget, columns each task's metrics (means over
    the cell's samples; the full cache's Δ and KL are ``-``)."""
    cells = [c for c in _cells(results) if c.task in REALTEXT_TASKS]
    if not cells:
        return ""
    corpus = results.config.get("corpus")
    n = {results.cells[c.key]["n"] for c in cells}
    lines = [f"Real text (corpus {corpus}; n = {', '.join(map(str, sorted(n)))} samples per cell; lower is better for "
             "NLL, Δ NLL and KL, in nats per token, teacher-forced). lm: the next "
             f"{results.config.get('continuation_tokens')} tokens of the document; recall: a verbatim "
             f"{results.config.get('recall_span')}-token span of the context after an instruction and a cue; "
             "Δ NLL = NLL - the full cache's on the same samples; KL = KL(full || compressed); copy = fraction of "
             "the span greedily reproduced before the first mistake; exact = whole span reproduced; top-1 = fraction of "
             "span tokens that are the argmax given the true span before them.", ""]
    tasks = [t for t in REALTEXT_TASKS if any(c.task == t for c in cells)]
    lengths = sorted({c.length for c in cells})
    modes = sorted({c.mode for c in cells if c.mode != "-"}) or ["-"]
    for mode in modes:
        for length in lengths:
            row_cells = [c for c in cells if c.length == length and (c.mode == mode or c.allocator == "-")]
            if not any(c.allocator != "-" for c in row_cells) and mode != modes[0]:
                continue
            present = [t for t in tasks if any(c.task == t for c in row_cells)]
            if not present:
                continue
            columns = [(t, m) for t in present for m in REALTEXT_METRICS[t]]
            lines += [f"### {mode.replace('_', '-')}, {length} tokens: real text", ""]
            lines.append("| method | allocator | budget | " + " | ".join(f"{t} {_METRIC_LABELS[m]}" for t, m in columns) + " |")
            lines.append("|" + "---|" * (len(columns) + 3))
            rows = sorted({(c.method, c.allocator, c.budget) for c in row_cells},
                          key=lambda r: (r[1] != "-", r[0], r[1], r[2]))
            for method, allocator, budget in rows:
                values = []
                for task, metric in columns:
                    key = Cell(method, allocator, budget, "-" if allocator == "-" else mode, task, length).key
                    entry = results.cells.get(key)
                    if entry is None:
                        values.append("")
                    elif allocator == "-" and metric in ("delta_nll", "kl"):
                        values.append("-")
                    elif metric == "delta_nll":
                        values.append(f"{entry['metrics'][metric]:+.3f}")
                    else:
                        values.append(f"{entry['metrics'][metric]:.3f}")
                label = "full" if allocator == "-" else f"{budget:.0%}"
                lines.append(f"| {method} | {allocator} | {label} | " + " | ".join(values) + " |")
            lines.append("")
    return "\n".join(lines)


def add_to_model_card(adapter_dir, results_dir, command: str) -> None:
    """Put the table of an eval output directory (``results_dir/results.md``) into the model card of the adapter in
    ``adapter_dir`` (its ``gatekv_config.json`` evaluation entry and ``README.md``), keyed by the output's name, so
    several evaluations (e.g. a needle headline and a suite) stand side by side (weights rewritten bit for bit)."""
    from gatekv.heads.adapter import Adapter

    table_path = Path(results_dir) / "results.md"
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path} does not exist: run the evaluation first")
    adapter = Adapter.from_pretrained(str(adapter_dir))
    tables = dict((adapter.evaluation or {}).get("tables") or {})
    tables[Path(results_dir).name] = {"markdown": table_path.read_text(encoding="utf-8"), "command": command}
    parts = [f"#### {name}\n\nCommand: `{entry['command']}`\n\n{entry['markdown'].rstrip()}" for name, entry in sorted(tables.items())]
    adapter.evaluation = {
        "description": "Query-agnostic (the context is compressed before the question is seen), held-out text and seeds; "
                       "every method through the same allocators and compacted cache.",
        "markdown": "\n\n".join(parts),
        "tables": tables,
    }
    adapter.save_pretrained(adapter_dir)


def plot_results(results: EvalResults, path: Path) -> Path:
    """Metrics vs budget, one row of panels per mode and length: mean accuracy over the accuracy tasks, then one panel
    per real-text metric (NLL, KL, and recall's copy / exact); one line per method/allocator, the full cache dashed.
    Needs matplotlib (``pip install 'gatekv[eval]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'gatekv[eval]'") from None
    cells = _cells(results)
    rows = sorted({(c.mode, c.length) for c in cells if c.allocator != "-"})
    if not rows:
        rows = [("-", c.length) for c in cells][:1]
    # a panel: (title, y label, tasks it averages, value of a cell entry, y limits or None)
    panels = []
    if any(c.task not in REALTEXT_TASKS for c in cells):
        panels.append(("accuracy", "accuracy (mean over tasks)", {c.task for c in cells if c.task not in REALTEXT_TASKS},
                       lambda entry: entry["accuracy"], (-0.02, 1.02)))
    for task in REALTEXT_TASKS:
        if any(c.task == task for c in cells):
            for metric in REALTEXT_METRICS[task]:
                if metric == "delta_nll":
                    continue  # the NLL panel shows it against the full cache's line
                limits = (-0.02, 1.02) if metric in ("copy", "exact", "top1") else None
                panels.append((f"{task}: {_METRIC_LABELS[metric]}", _METRIC_TITLES[metric], {task},
                               lambda entry, m=metric: entry["metrics"][m], limits))
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(5.5 * len(panels), 4 * len(rows)), squeeze=False)
    for row, (mode, length) in enumerate(rows):
        for ax, (title, ylabel, tasks, value, limits) in zip(axes[row], panels):
            full = [value(results.cells[c.key]) for c in cells if c.allocator == "-" and c.length == length and c.task in tasks]
            if full:
                ax.axhline(sum(full) / len(full), color="black", linestyle="--", label="full cache")
            lines = sorted({(c.method, c.allocator) for c in cells if c.mode == mode and c.length == length
                            and c.allocator != "-" and c.task in tasks})
            for method, allocator in lines:
                points = {}
                for c in cells:
                    if (c.method, c.allocator, c.mode, c.length) == (method, allocator, mode, length) and c.task in tasks:
                        points.setdefault(c.budget, []).append(value(results.cells[c.key]))
                budgets = sorted(points)
                ax.plot(budgets, [sum(points[b]) / len(points[b]) for b in budgets], marker="o", label=f"{method} / {allocator}")
            ax.set_xscale("log")
            ax.set_xlabel("kept fraction of the context (per KV head)")
            ax.set_ylabel(ylabel)
            if limits is not None:
                ax.set_ylim(*limits)
            ax.set_title(f"{title}; {mode.replace('_', '-')}, {length or 'native'} tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
    finally:
        plt.close(fig)
    return path
