"""Reporting of eval results: markdown tables, the accuracy-vs-budget plot, the adapter's model card entry.

``run_eval`` writes ``results.md`` (:func:`format_markdown`) and ``accuracy_vs_budget.png`` (:func:`plot_results`);
``gatekv eval --card DIR`` puts the table into an adapter's model card (:func:`add_to_model_card`).
"""

from __future__ import annotations

from pathlib import Path

from gatekv.eval.realtext import REALTEXT_METRICS, REALTEXT_TASKS
from gatekv.eval.results import SOLVED, Cell, EvalResults
from gatekv.io import atomic_write

__all__ = ["add_to_model_card", "format_markdown", "format_realtext_markdown", "plot_results"]


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
    if results.config.get("corpus_documents"):
        corpus = f"{corpus}, {len(results.config['corpus_documents'])} documents"
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
