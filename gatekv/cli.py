"""``gatekv`` command line: parses arguments and calls library functions (everything is reachable from Python).

    gatekv bench decode --length 8192 --budget 0.1 --steps 32 --device cpu
    gatekv generate --scorer snapkv --budget 0.1 --prompt-file doc.txt --question "Who ...?" --max-new-tokens 64
    gatekv generate --adapter checkpoints/smollm2-135m-retaining-heads --budget 0.1 --prompt-file doc.txt --question Q
    gatekv export runs/smollm2-135m-retaining-head out/adapter
    gatekv eval configs/eval/quickstart.yaml num_samples=10
    gatekv train configs/train/smollm2-135m-retaining-head.yaml trainer.max_steps=100
    gatekv validate configs/train/smollm2-135m-retaining-head.yaml

Errors are one line on stderr naming the field, file or value, with a non-zero exit: 2 for a bad input or config,
1 for a fault while running (disk full, a non-finite loss, ...), 143 when ``gatekv train`` stopped on SIGTERM.
``--debug`` anywhere on the command line (or ``GATEKV_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from gatekv.errors import DEBUG_FLAG, CommandError, debug_requested, run_reporting_errors
from gatekv.settings import DEFAULT_CHUNK_SIZE, DEFAULT_SINKS, DEFAULT_WINDOW

__all__ = ["build_parser", "main", "retrieval_heads_main", "run_reporting_errors"]


def _budget(text: str) -> float | int:
    """A budget: a ratio of the prompt if it contains '.' (0.1), else a token count (512). Its range is checked
    once, by :class:`gatekv.settings.CompressionConfig` (``gatekv generate``) or :class:`gatekv.allocators.Budget`."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a ratio like 0.1 or a token count like 512, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatekv", description="KV-cache compression for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    decode = bench_kinds.add_parser(
        "decode",
        help="prefill time, decode ms/token and KV bytes: full cache vs compressed caches",
        description="Measures the full cache and every scorer x allocator x budget on the same prompt, in one process.",
    )
    decode.add_argument("--length", type=int, default=8192, help="prompt length in tokens (default 8192)")
    decode.add_argument(
        "--budget", type=_budget, nargs="+", default=[0.1], help="kept tokens per KV head: ratio or count (default 0.1)"
    )
    decode.add_argument("--steps", type=int, default=32, help="timed decode steps; the median is reported (default 32)")
    decode.add_argument("--warmup", type=int, default=2, help="untimed decode steps before the timed ones (default 2)")
    decode.add_argument(
        "--rounds", type=int, default=4,
        help="the timed steps run in this many rounds, each over every setting in turn (default 4)",
    )
    decode.add_argument(
        "--prefill-rounds", type=int, default=1,
        help="every prefill runs this many times in interleaved rounds; medians of prefill and scoring seconds are "
             "reported (default 1)",
    )
    decode.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    decode.add_argument(
        "--model",
        choices=["smollm2", "llama8b-random"],
        default=None,
        help="default: smollm2 on CPU, llama8b-random (random weights, Llama-3.1-8B shape, bf16) on CUDA",
    )
    decode.add_argument("--num-layers", type=int, default=None, help="layers of llama8b-random (default 32)")
    decode.add_argument("--scorer", nargs="+", default=["snapkv"], help="scorers to measure (default snapkv)")
    decode.add_argument(
        "--allocator", nargs="+", default=["uniform", "adakv"], help="allocators to measure (default uniform adakv)"
    )
    decode.add_argument(
        "--heads-dtype", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
        help="measure every adapter given to --scorer once per dtype its heads compute in (default: as stored)",
    )
    decode.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
        help=f"tokens per chunk of the chunked-prefill rows; 0 = no such rows (default {DEFAULT_CHUNK_SIZE})"
    )
    decode.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    decode.add_argument("--seed", type=int, default=0, help="prompt / random weights seed (default 0)")

    kernels = bench_kinds.add_parser(
        "kernels",
        help="compact / append / decode kernels: bandwidth vs device copy and decode vs full-cache SDPA",
        add_help=False,
    )
    kernels.add_argument("args", nargs=argparse.REMAINDER, help="see gatekv bench kernels --help")

    generate = commands.add_parser(
        "generate",
        help="answer a question about a document with a compressed cache (trained adapter or training-free scorer)",
        description="Runs a model with gatekv's compressed cache and prints the answer, then one stats line "
        "(tokens kept, KV bytes vs the full cache, time) on stderr.",
    )
    generate.add_argument(
        "--model", default=None, help="base model: smollm2 (embedded), a Hub id or a path (default: the adapter's own "
        "base model, else smollm2)"
    )
    what = generate.add_mutually_exclusive_group()
    what.add_argument("--adapter", default=None, help="trained adapter: a directory or a Hub id")
    what.add_argument("--scorer", default=None, help="training-free scorer name, or 'none' for the full cache "
                      "(default snapkv when no adapter is given)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", help="text file with the document/prompt ('-' = standard input)")
    source.add_argument("--prompt", help="the document/prompt text itself")
    generate.add_argument("--question", default=None, help="question asked after the document (default: none)")
    generate.add_argument("--allocator", default="uniform", help="allocator name (default uniform)")
    generate.add_argument("--budget", type=_budget, default=0.1, help="ratio or token count per KV head (default 0.1)")
    generate.add_argument("--prefill", choices=["one_shot", "chunked"], default="one_shot", help="prefill mode")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    generate.add_argument(
        "--query-agnostic",
        action="store_true",
        help="compress the document before the question is seen (default: the question is in the prompt)",
    )
    generate.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                          help=f"recent tokens always kept (default {DEFAULT_WINDOW})")
    generate.add_argument("--sinks", type=int, default=DEFAULT_SINKS, help=f"first tokens always kept (default {DEFAULT_SINKS})")
    generate.add_argument("--observe-window", type=int, default=None,
                          help="last prompt tokens whose attention the scorer observes (default: --window)")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    generate.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                          help="model dtype (default float32; use bfloat16 on GPUs)")
    generate.add_argument("--revision", default=None, help="base model revision (Hub)")

    evaluate = commands.add_parser(
        "eval",
        help="accuracy vs budget: methods x allocators x budgets x tasks x lengths (resumable)",
        description="Runs the grid of an eval config and writes results.json, results.md and accuracy_vs_budget.png "
        "into its output directory; a rerun resumes from results.json.",
    )
    evaluate.add_argument("config", help="eval YAML (see configs/eval/)")
    evaluate.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. num_samples=10")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--card", action="append", default=[], metavar="ADAPTER_DIR",
                          help="also put the results table into this adapter directory's model card (repeatable)")

    export = commands.add_parser(
        "export",
        help="turn a training checkpoint (or a run directory's newest) into an adapter directory",
        description="Writes gatekv_config.json, adapter_model.safetensors and README.md (+ lora/ when LoRA was "
        "trained) from a gatekv train checkpoint; the base model is not needed.",
    )
    export.add_argument("checkpoint", help="step-N.ckpt file, DeepSpeed checkpoint directory, or run directory")
    export.add_argument("out_dir", help="adapter directory to write")
    export.add_argument("--summary", default=None, help="summary.json of the run (default: the run directory's)")
    for name, text in (
        ("train", "train retaining heads / gates: gatekv train CONFIG.yaml [key.sub=value ...]"),
        ("validate", "check a training config without running it: gatekv validate CONFIG.yaml [key=value ...]"),
        ("retrieval-heads", "identify (semantic) retrieval heads for compresskv: gatekv retrieval-heads MODEL -o heads.json"),
    ):
        sub = commands.add_parser(name, help=text, add_help=False)
        sub.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the training entry point")
    return parser


def _run_bench_decode(args) -> int:
    from gatekv.bench import bench_decode
    from gatekv.models import check_device
    from gatekv.settings import resolve_budget

    check_device(args.device, "--device")
    for budget in args.budget:  # before minutes of model loading
        resolve_budget(budget, "--budget")
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--rounds", args.rounds, 1),
                                ("--prefill-rounds", args.prefill_rounds, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    bench_decode(
        length=args.length,
        budgets=tuple(args.budget),
        steps=args.steps,
        device=args.device,
        model_name=args.model,
        scorers=tuple(args.scorer),
        allocators=tuple(args.allocator),
        num_layers=args.num_layers,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        chunk_size=args.chunk_size or None,
        rounds=args.rounds,
        prefill_rounds=args.prefill_rounds,
        heads_dtypes=tuple(args.heads_dtype) if args.heads_dtype else None,
    )
    return 0


def _run_generate(args) -> int:
    import torch

    from gatekv.inference import GateKV
    from gatekv.models import check_device
    from gatekv.settings import CompressionConfig

    check_device(args.device, "--device")
    if args.prompt is not None:
        context = args.prompt
    elif args.prompt_file == "-":
        context = sys.stdin.read()
    else:
        try:
            with open(args.prompt_file, encoding="utf-8") as handle:
                context = handle.read()
        except OSError as error:
            raise ValueError(f"--prompt-file {args.prompt_file}: {error.strerror}") from None
    if not context.strip():
        source_name = "--prompt" if args.prompt is not None else f"--prompt-file {args.prompt_file}"
        raise ValueError(f"{source_name}: the prompt is empty")
    scorer = args.scorer if args.scorer is not None else (None if args.adapter else CompressionConfig.scorer)
    if scorer is not None and scorer.lower() in ("none", "full"):
        scorer = None
    # the settings, validated once and before the model loads (an adapter's heads replace the scorer)
    config = CompressionConfig(scorer or CompressionConfig.scorer, args.allocator, args.budget, args.prefill,
                               window=args.window, sinks=args.sinks, observe_window=args.observe_window)
    model = args.model if args.model is not None else (None if args.adapter else "smollm2")
    kv = GateKV.from_pretrained(
        model,
        adapter=args.adapter,
        config=config if scorer is not None or args.adapter else None,
        revision=args.revision,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(kv.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = kv.answer(
        context, args.question, query_aware=not args.query_agnostic, max_new_tokens=args.max_new_tokens, streamer=streamer
    )
    if not args.stream:
        print(result.text)
    what = kv.adapter.describe() if kv.adapter else (scorer or "full cache")
    setting = f"; {args.allocator} budget {args.budget}" if kv.compresses else ""
    print(f"[gatekv] {what}{setting}: {result.stats_line()}", file=sys.stderr)
    return 0


def _run_eval(args) -> int:
    from gatekv.eval import load_eval_config, run_eval

    config = load_eval_config(args.config, args.overrides)
    run_eval(config, progress=not args.no_progress)
    out = config.output_dir
    print((out / "results.md").read_text(encoding="utf-8"))
    plot = out / "accuracy_vs_budget.png"
    print(f"[gatekv eval] results: {out / 'results.json'}; table: {out / 'results.md'}"
          + (f"; plot: {plot}" if plot.exists() else ""))
    if args.card:
        from gatekv.eval.report import add_to_model_card

        command = " ".join(["gatekv eval", args.config, *args.overrides])
        for directory in args.card:
            add_to_model_card(directory, out, command)
            print(f"[gatekv eval] model card updated: {directory}")
    return 0


def _run_export(args) -> int:
    try:
        from gatekv.training.export import export_checkpoint
    except ImportError as error:  # the train extra is needed to read training checkpoints
        raise CommandError(f"gatekv export needs the training extra (pip install 'gatekv[train]'): {error}")
    out = export_checkpoint(args.checkpoint, args.out_dir, summary=args.summary)
    print(f"[gatekv export] adapter written to {out}")
    return 0


def _passthrough(argv: list[str]):
    """Commands whose arguments belong to another entry point (its own parser): (entry, remaining argv)."""
    if argv[:1] in (["train"], ["validate"]):
        # Lightning and DeepSpeed are imported only here, never by inference code paths.
        from gatekv.training import cli as training_cli

        entry = training_cli.train_main if argv[0] == "train" else training_cli.validate_main
        return entry, argv[1:]
    if argv[:1] == ["retrieval-heads"]:
        return retrieval_heads_main, argv[1:]
    if argv[:2] == ["bench", "kernels"]:
        from gatekv.bench_kernels import main as bench_kernels_main

        return bench_kernels_main, argv[2:]
    return None, argv


def retrieval_heads_main(argv: list[str] | None = None) -> int:
    """``gatekv retrieval-heads MODEL -o heads.json``: identify retrieval heads of a model, print them, write JSON
    (:func:`gatekv.scorers.retrieval_heads.identify_retrieval_heads` from Python)."""
    import torch

    from gatekv.models import load_base_model
    from gatekv.scorers.retrieval_heads import KINDS, identify_retrieval_heads

    parser = argparse.ArgumentParser(
        prog="gatekv retrieval-heads", description="Identify (semantic) retrieval heads on synthetic inputs."
    )
    parser.add_argument("model", help="smollm2 (the embedded model), a Hugging Face model id or a local path")
    parser.add_argument("--output", "-o", required=True, help="JSON file to write")
    parser.add_argument("--kind", choices=KINDS, default="semantic", help="score that selects the heads")
    parser.add_argument("--samples", type=int, default=4, help="random sequences per test")
    parser.add_argument("--length", type=int, default=256, help="random tokens per copy / filler length")
    parser.add_argument("--answer-length", type=int, default=8, help="tokens of the answer span")
    parser.add_argument("--heads-per-layer", type=int, default=None, help="heads kept per layer (default: fraction)")
    parser.add_argument("--fraction", type=float, default=0.15, help="fraction of heads per layer if not given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    args = parser.parse_args(argv)

    # smollm2 (embedded), tiny:<family>, a Hub id or a local path
    model, tokenizer = load_base_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    result = identify_retrieval_heads(
        model, tokenizer, samples=args.samples, length=args.length, answer_length=args.answer_length,
        heads_per_layer=args.heads_per_layer, fraction=args.fraction, kind=args.kind, seed=args.seed,
    )
    result.settings["model"] = args.model
    result.save(args.output)
    scores = result.scores()
    for layer, heads in enumerate(result.heads()):
        print(f"layer {layer}: heads {heads} ({args.kind} {[round(float(scores[layer, h]), 3) for h in heads]})")
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    entry, rest = _passthrough(argv)
    if entry is not None:
        if argv[0] in ("train", "validate"):  # their own entry points report errors (and read --debug) themselves
            rest = rest + [DEBUG_FLAG] * debug
        return run_reporting_errors(f"gatekv {argv[0]}", lambda: entry(rest), debug)
    args = build_parser().parse_args(argv)
    runners = {"generate": _run_generate, "export": _run_export, "eval": _run_eval}
    if args.command == "bench" and args.bench == "decode":
        run = _run_bench_decode
        prog = "gatekv bench decode"
    else:
        run = runners[args.command]  # argparse rejects unknown commands first
        prog = f"gatekv {args.command}"
    return run_reporting_errors(prog, lambda: run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
