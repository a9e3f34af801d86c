"""The Attention-Gate SFT comparison table (issue 15, item 3) from the two eval runs' results.json.

Reads ``gatekv eval configs/eval/smollm2-multikey-lora.yaml`` and ``... smollm2-multikey-budgets.yaml`` outputs and
prints one markdown row per cell: accuracy (n), mean kept fraction of the context (kept tokens per head / prompt
tokens, per sample) and the share evicted::

    python benchmarks/attention_gate_lora.py runs/eval/smollm2-multikey-lora/results.json \
        runs/eval/smollm2-multikey-budgets/results.json > benchmarks/results/smollm2-attention-gate-lora/table.md
"""

from __future__ import annotations

import json
import statistics
import sys


def rows(path: str):
    data = json.load(open(path))
    for cell in data["cells"].values():
        c = cell["cell"]
        samples = cell["samples"]
        kept = [s["kept_per_head"] / s["prompt_tokens"] for s in samples if s.get("kept_per_head") is not None]
        kept_fraction = statistics.mean(kept) if kept else 1.0
        setting = "full cache" if c["allocator"] in ("-",) or (c["budget"] == 1.0 and c["allocator"] == "uniform") \
            else (f"{c['allocator']} tau 0 (in-context)" if c["allocator"] == "threshold" else f"{c['allocator']} @ {c['budget']}")
        yield (c["method"], setting, c["task"], c["length"], cell["accuracy"], cell["n"], kept_fraction,
               min(kept) if kept else 1.0, max(kept) if kept else 1.0)


def main(paths: list[str]) -> None:
    print("| model | cache | task | context tokens | accuracy | n | kept (mean, min-max) | evicted |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        for method, setting, task, length, acc, n, kept, low, high in rows(path):
            print(f"| {method} | {setting} | {task} | {length} | {acc:.2f} | {n} | {kept:.3f} ({low:.3f}-{high:.3f}) "
                  f"| {1 - kept:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
