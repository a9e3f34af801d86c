#!/usr/bin/env python
"""Paired differences between two cells of ``gatekv eval`` real-text results, sample by sample.

A mean over n = 32 samples moves by more than the gap between two good methods; the same samples under both methods
give a paired difference whose standard error is much smaller. For each metric, prints the mean of (A - B) over the
samples both cells hold (matched by seed and document), its standard error, and on how many samples A is lower::

    python benchmarks/paired.py benchmarks/results/smollm2-realtext-32/results.json \\
        "retaining-heads|adakv" "snapkv|adakv" --task lm --metric kl delta_nll

A cell is ``method|allocator`` (budget, mode and length are taken from ``--budget`` / ``--mode`` / ``--length``
when the file holds several). ``A`` and ``B`` may live in different files (``--b-file``) when both runs used the same
samples (same corpus, seeds and length: the full-cache rows then agree).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load_cells(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: cannot read eval results ({error})") from None
    return data.get("cells", {})


def find_cell(cells: dict[str, dict], label: str, args, path: Path) -> dict:
    method, _, allocator = label.partition("|")
    matches = [
        c for c in cells.values()
        if c["cell"]["method"] == method and c["cell"]["allocator"] == (allocator or "-")
        and c["cell"]["task"] == args.task
        and (args.budget is None or c["cell"]["budget"] == args.budget)
        and (args.mode is None or c["cell"]["mode"] in (args.mode, "-"))
        and (args.length is None or c["cell"]["length"] == args.length)
    ]
    if len(matches) != 1:
        found = sorted({f"{c['cell']['method']}|{c['cell']['allocator']}" for c in cells.values()})
        raise SystemExit(f"{path}: {len(matches)} cells match {label!r} for task {args.task!r} "
                         f"(narrow with --budget/--mode/--length); cells: {', '.join(found)}")
    return matches[0]


def paired(a: list[dict], b: list[dict], metric: str) -> tuple[float, float, int, int]:
    """(mean, standard error, samples where a < b, n) of a - b over the samples both hold."""
    by_key = {(s["seed"], s.get("document")): s for s in b}
    diffs = [s[metric] - by_key[(s["seed"], s.get("document"))][metric] for s in a
             if (s["seed"], s.get("document")) in by_key and s.get(metric) is not None]
    n = len(diffs)
    if n == 0:
        raise SystemExit(f"no sample with {metric!r} in both cells")
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se, sum(d < 0 for d in diffs), n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="results.json of gatekv eval")
    parser.add_argument("a", help="method|allocator")
    parser.add_argument("b", help="method|allocator")
    parser.add_argument("--b-file", type=Path, help="results.json holding B (default: the same file)")
    parser.add_argument("--task", default="lm")
    parser.add_argument("--metric", nargs="+", default=["kl", "delta_nll"])
    parser.add_argument("--budget", type=float)
    parser.add_argument("--mode")
    parser.add_argument("--length", type=int)
    args = parser.parse_args(argv)
    a = find_cell(load_cells(args.file), args.a, args, args.file)
    b_path = args.b_file or args.file
    b = find_cell(load_cells(b_path), args.b, args, b_path)
    for metric in args.metric:
        mean, se, lower, n = paired(a["samples"], b["samples"], metric)
        print(f"{args.task} {metric}: {args.a} - {args.b} = {mean:+.3f} ± {se:.3f} (SE, n = {n}); "
              f"A lower on {lower}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
