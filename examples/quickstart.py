"""gatekv quickstart: full cache vs SnapKV vs the shipped trained retaining heads, on held-out long-context tasks.

Runs on CPU with the embedded SmolLM2-135M-Instruct (``make quickstart`` installs everything). The contexts are
compressed before the question is seen (query-agnostic: the setting of cache reuse), then the question is asked on
the compressed cache. Prints the accuracy table and where the plot is; a rerun resumes (finished cells are kept).

    python examples/quickstart.py [--samples 8] [key=value ...]        # overrides of configs/eval/quickstart.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never try the network

from gatekv.eval import load_eval_config, run_eval  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "eval" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="samples per task (default: the config's)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. budgets=[0.05,0.1]")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"num_samples={args.samples}"] if args.samples else [])
    config = load_eval_config(CONFIG, overrides)
    root = CONFIG.parent.parent.parent
    for method in config.methods:  # the shipped adapter lives in the repository: resolve it from anywhere
        if method.adapter and not Path(method.adapter).is_absolute() and (root / method.adapter).is_dir():
            method.adapter = str(root / method.adapter)
    print(f"gatekv quickstart: {len(config.methods)} methods x budgets {config.budgets} x tasks {config.tasks}, "
          f"{config.num_samples} samples each, {config.lengths[0]}-token contexts, query-agnostic")
    start = time.perf_counter()
    run_eval(config)
    out = config.output_dir
    print()
    print((out / "results.md").read_text(encoding="utf-8"))
    plot = out / "accuracy_vs_budget.png"
    print(f"done in {time.perf_counter() - start:.0f} s. results: {out / 'results.json'}"
          + (f"; plot: {plot}" if plot.exists() else ""))
    print("retrain the adapter (~20 min): python train/prepare_data.py --mix docs=64,qa=144,multi=8 --num-samples 216 "
          "--max-tokens 7936 --part-max-tokens docs=4096,qa=2400 --out runs/data/smollm2-mix3.jsonl && "
          "gatekv train configs/train/smollm2-135m-retaining-head-mix.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
