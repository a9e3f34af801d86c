"""``run_eval(config)``: every cell (method, allocator, budget, mode, task, length) over the same samples.

Output directory (``config.output``)::

    results.json             every finished cell with per-sample predictions and scores (written atomically after
                             each cell, so a crash loses no finished cell; a rerun resumes from it)
    results.md               tables: one per (mode, length), rows = method / allocator / budget, columns = tasks
    accuracy_vs_budget.png   mean accuracy over tasks vs budget, one line per method and allocator

Trained adapters and training-free scorers go through the same path (:class:`gatekv.GateKV`): same prompts, same
allocators, same compacted cache. The full cache runs once per (task, length) and is the reference row.
Query-agnostic one-shot cells share one prefill per sample (:func:`gatekv.compress.shared_prefill`: every scorer
scores the same forward, each (scorer, allocator, budget) compacts its own copy): the answers are those of one
prefill per cell, several times faster; their progress is saved per sample. Cells whose allocator observes the
prefill (CAKE, D2O), LoRA adapters and query-aware cells run one prefill each.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatekv.eval.config import EvalConfig, MethodConfig
from gatekv.eval.metrics import score_answer
from gatekv.eval.tasks import EvalSample, Haystack, make_task_samples
from gatekv.io import atomic_write, atomic_write_text

__all__ = ["Cell", "EvalResults", "add_to_model_card", "format_markdown", "plot_results", "run_eval"]

RESULTS_VERSION = 1
SOLVED = 0.8
"""A task counts as solved by the full cache at this accuracy; ratios to the full cache use solved tasks only."""
_COMPARABLE = ("model", "dtype", "num_samples", "seed_base", "haystack_files", "window", "sinks", "prefill",
               "chunk_size", "max_new_tokens")


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
    """``Cell.key`` -> ``{"cell": {...}, "accuracy": float, "n": int, "seconds": float, "samples": [...]}``."""
    partial: dict[str, list[dict]] = field(default_factory=dict)
    """``Cell.key`` -> per-sample records of a cell still running (shared-prefill cells advance sample by sample)."""

    def accuracy(self, cell: Cell) -> float | None:
        entry = self.cells.get(cell.key)
        return None if entry is None else entry["accuracy"]

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
    if differing:
        details = "; ".join(f"{k}: {existing.config.get(k)!r} (file) vs {config.get(k)!r} (config)" for k in differing)
        raise ValueError(f"{path} was made with other settings ({details}); use another output or resume: false")


def _samples(config: EvalConfig, tokenizer, head_tokens: int) -> dict[tuple[str, int], list[EvalSample]]:
    from gatekv.eval.loaders import load_suite

    haystack = Haystack.from_files(config.haystack_files) if config.haystack_files else None
    out = {}
    for task in config.tasks:
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
    for (task, length), _ in samples.items():
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
    its ratio to the full cache (solved = full-cache accuracy >= 0.8)."""
    cells = _cells(results)
    full = {(c.task, c.length): results.cells[c.key]["accuracy"] for c in cells if c.allocator == "-"}
    lengths = sorted({c.length for c in cells})
    modes = sorted({c.mode for c in cells if c.mode != "-"}) or ["-"]
    tasks = sorted({c.task for c in cells}, key=lambda t: (t.split(":")[0], t))
    n = {entry["n"] for entry in results.cells.values()}
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
    """Mean accuracy over tasks vs budget (one panel per mode and length, one line per method/allocator; the full
    cache dashed). Needs matplotlib (``pip install 'gatekv[eval]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'gatekv[eval]'") from None
    cells = _cells(results)
    panels = sorted({(c.mode, c.length) for c in cells if c.allocator != "-"})
    if not panels:
        panels = [("-", c.length) for c in cells][:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (mode, length) in zip(axes[0], panels):
        full = [results.cells[c.key]["accuracy"] for c in cells if c.allocator == "-" and c.length == length]
        if full:
            ax.axhline(sum(full) / len(full), color="black", linestyle="--", label="full cache")
        lines = sorted({(c.method, c.allocator) for c in cells if c.mode == mode and c.length == length and c.allocator != "-"})
        for method, allocator in lines:
            points = {}
            for c in cells:
                if (c.method, c.allocator, c.mode, c.length) == (method, allocator, mode, length):
                    points.setdefault(c.budget, []).append(results.cells[c.key]["accuracy"])
            budgets = sorted(points)
            ax.plot(budgets, [sum(points[b]) / len(points[b]) for b in budgets], marker="o", label=f"{method} / {allocator}")
        ax.set_xscale("log")
        ax.set_xlabel("kept fraction of the context (per KV head)")
        ax.set_ylabel("accuracy (mean over tasks)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{mode.replace('_', '-')}, {length or 'native'} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
    finally:
        plt.close(fig)
    return path
