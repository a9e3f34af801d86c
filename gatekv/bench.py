"""Decode benchmark: full cache vs compressed caches, measured the same way in the same process.

For one prompt of ``length`` tokens, every setting runs the same steps, driving the model's forward by hand with its
cache. The settings, in order: the full cache; then per budget the *dense floor* (a dense cache holding only the
last K prompt tokens, K = the budget's tokens per head: what decoding over the kept size costs at best), each
scorer x allocator with a one-shot prefill, and each scorer with a chunked prefill (first allocator,
``chunk_size`` tokens per chunk, Locret's regime). Steps:

1. prefill: one forward over the prompt (``logits_to_keep=1``); for a compressed setting this includes scoring
   and compaction, since ``compress()`` compacts inside that forward's hooks. With ``prefill_rounds = n > 1`` every
   setting's prefill runs ``n`` times in interleaved rounds (each round: every setting in turn, each on a fresh
   cache, the full cache last, the others starting one later each round) and the medians of its prefill and scoring
   seconds are reported: one prefill's wall time on a shared 2-core VM moves by +-10%, which a scoring cost of a
   few % cannot be read through; decoding continues from the last round's caches;
2. ``warmup`` decode steps, not timed; then ``steps`` single-token forwards (greedy next token), each timed alone
   with the device synchronized before and after; the median is reported. The timed steps run in ``rounds``: each
   round runs every setting in turn (all caches stay alive), so a drift of the machine's speed is shared by all
   settings (on a shared 2-core VM, the same dense decode drifts by +-15% over minutes);
3. KV bytes: keys + values allocated by the cache right after the prefill (capacity included for the compressed
   cache: its growth room is real memory) and after the last step.

The full cache is transformers' ``DynamicCache`` with the model's default attention (SDPA); a compressed cache is
gatekv's ``CompressedCache`` with its ragged attention. Devices: ``cpu`` (SmolLM2-135M-Instruct, float32) or
``cuda`` (a randomly initialised model of Llama-3.1-8B's shape in bfloat16: 32 layers, 32 query heads, 8 KV heads,
head dim 128; random weights time the same as trained ones).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from gatekv.models import cache_kwarg
from gatekv.settings import DEFAULT_SINKS, DEFAULT_WINDOW

__all__ = [
    "DECODE_COLUMNS",
    "DecodeResult",
    "LLAMA31_8B_SHAPE",
    "bench_decode",
    "format_decode_table",
    "random_llama",
    "run_decode_benchmark",
]

LLAMA31_8B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
"""Shape of Llama-3.1-8B (RoPE scaling left out: it changes no timing)."""


@dataclass
class DecodeResult:
    """Measurements of one setting."""

    label: str
    """``full``, ``dense floor@budget`` or ``scorer+allocator@budget`` (`` chunked`` appended for a chunked prefill)."""
    prompt_tokens: int
    prefill_seconds: float
    """Wall time of the prefill forward (scoring and compaction included)."""
    decode_ms: float
    """Median wall time of one single-token decode forward, in milliseconds."""
    decode_ms_all: list[float] = field(default_factory=list)
    """Every timed decode step, in milliseconds."""
    kv_bytes: int = 0
    """KV bytes allocated right after the prefill."""
    kv_bytes_end: int = 0
    """KV bytes allocated after the last decode step."""
    kept_per_head: float | None = None
    """Mean tokens kept per (layer, KV head) after the prefill (compressed settings)."""
    tokens: list[int] = field(default_factory=list)
    """Greedy tokens produced by the decode steps (warm-up included)."""
    kind: str = "full"
    """``full``, ``floor`` (dense cache of the kept size), ``one_shot`` or ``chunked`` (compressed prefill mode)."""
    budget: float | int | None = None
    """The budget of a floor or compressed setting (None for the full cache)."""
    cache_tokens: int | None = None
    """Prompt tokens held by a floor setting's dense cache."""
    score_seconds: float | None = None
    """Of the prefill, the seconds the scorer took (compressed settings: ``stats.score_seconds``; a trained scorer's
    forward, a replay's extra forwards)."""


def random_llama(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int | None = None,
    seed: int = 0,
    **overrides,
) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of Llama-3.1-8B's shape with random weights, built directly on ``device``.

    num_layers: fewer layers than 32 (quick runs); overrides: any other ``LlamaConfig`` field.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(LLAMA31_8B_SHAPE, **overrides)
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    config = LlamaConfig(**shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def smollm2_needle(length: int, seed: int = 0, device="cpu"):
    """The benchmarks' model and prompt: SmolLM2-135M-Instruct (float32 on CPU, bfloat16 elsewhere), its tokenizer
    and a single-needle prompt of about ``length`` tokens ``(1, T)`` on ``device``."""
    from gatekv.eval.needle import needle_prompt
    from gatekv.smollm2 import load_smollm2

    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, tokenizer = load_smollm2(dtype=dtype, device=device)
    return model, tokenizer, needle_prompt(tokenizer, length, seed).prompt_ids.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _cache_bytes(cache) -> int:
    from gatekv.cache import CompressedCache

    return cache.kv_bytes() if isinstance(cache, CompressedCache) else _dynamic_cache_bytes(cache)


class _Run:
    """One setting being measured: its cache (and compression session), the next input token, what was measured."""

    def __init__(self, label: str, kind: str, budget, cache, session=None, cache_tokens: int | None = None):
        self.label, self.kind, self.budget, self.cache, self.session = label, kind, budget, cache, session
        self.cache_tokens = cache_tokens
        self.token = None
        self.prefill_seconds = 0.0
        self.score_seconds: float | None = None  # compressed settings: median over the prefill rounds
        self.kv_bytes = 0
        self.times: list[float] = []
        self.tokens: list[int] = []

    def entered(self):
        """The context its forwards run in: the compression session re-entered, or nothing (a dense cache)."""
        import contextlib

        return self.session.entered() if self.session is not None else contextlib.nullcontext()

    def prefill(self, model, input_ids: torch.Tensor) -> None:
        device = input_ids.device
        with self.entered():
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=input_ids, **{cache_kwarg(model): self.cache}, use_cache=True, logits_to_keep=1)
            _sync(device)
            self.prefill_seconds = time.perf_counter() - start
        self.kv_bytes = _cache_bytes(self.cache)
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)

    def decode(self, model, steps: int, timed: bool) -> None:
        """``steps`` greedy single-token forwards, each timed alone (device synchronized before and after)."""
        device = self.token.device
        with self.entered():
            for _ in range(steps):
                _sync(device)
                start = time.perf_counter()
                out = model(input_ids=self.token, **{cache_kwarg(model): self.cache}, use_cache=True)
                self.token = out.logits[:, -1].argmax(-1, keepdim=True)
                _sync(device)
                if timed:
                    self.times.append((time.perf_counter() - start) * 1e3)
                self.tokens.append(int(self.token[0, 0]))

    def result(self, prompt_tokens: int) -> DecodeResult:
        stats = self.session.stats if self.session is not None else None
        kept = None if stats is None or stats.kept_tokens is None else float(stats.kept_tokens.double().mean())
        if self.kind == "floor":
            kept = float(self.cache_tokens)
        return DecodeResult(
            self.label, prompt_tokens, self.prefill_seconds, statistics.median(self.times), self.times,
            self.kv_bytes, _cache_bytes(self.cache), kept,
            self.tokens, self.kind, self.budget, self.cache_tokens,
            score_seconds=self.score_seconds,
        )


def run_decode_benchmark(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    budgets: tuple[float | int, ...] = (0.1,),
    scorers: tuple = ("snapkv",),
    allocators: tuple[str, ...] = ("uniform", "adakv"),
    steps: int = 32,
    warmup: int = 2,
    window: int = DEFAULT_WINDOW,
    sinks: int = DEFAULT_SINKS,
    chunk_size: int | None = 512,
    log=None,
    rounds: int = 4,
    prefill_rounds: int = 1,
) -> list[DecodeResult]:
    """Measure the full cache, then per budget the dense floor, every ``scorer x allocator`` (one-shot prefill) and
    every scorer with a chunked prefill (first allocator), on the same prompt.

    input_ids:  (1, T) prompt on the model's device
    budgets:    kept tokens per KV head: ratios of the prompt (float) or counts (int)
    scorers:    registered scorer names, Scorer instances (labelled by ``name``) or ``(label, Scorer)`` pairs
    chunk_size: tokens per chunk of the chunked settings; None = no chunked settings (also skipped when the prompt
                fits in one chunk)
    log:        optional callable receiving one line per finished setting (progress)
    rounds:     the timed steps are split into this many rounds, and each round runs every setting in turn (each
                compressed setting's session re-entered), so that a drift in the machine's speed over the minutes of
                the benchmark (other tenants, clocks) lands on every setting alike instead of on whichever ran then
    prefill_rounds: every setting's prefill runs this many times, interleaved in the same way (fresh caches each
                round; the full cache last, the others starting one later each round); the medians of prefill
                and scoring seconds are reported
    returns:    one :class:`DecodeResult` per setting, the full cache first
    """
    from transformers import DynamicCache

    from gatekv.allocators import Budget
    from gatekv.compress import CompressionSession

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, T), got {tuple(input_ids.shape)}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if rounds < 1 or prefill_rounds < 1:
        raise ValueError(f"rounds and prefill_rounds must be >= 1, got rounds={rounds}, prefill_rounds={prefill_rounds}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    prompt_tokens = input_ids.shape[1]
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]

    def compressed(scorer, allocator, budget, prefill) -> _Run:
        name, scorer = scorer if isinstance(scorer, tuple) else (scorer if isinstance(scorer, str) else scorer.name, scorer)
        session = CompressionSession(model, scorer=scorer, allocator=allocator, budget=budget, window=window,
                                     sinks=sinks, prefill=prefill, chunk_size=chunk_size or 512)
        cache = session.new_cache()
        # what generate() would declare: its max_new_tokens counts the prefill's token, then one per decode step
        session.expect_new_tokens(1 + warmup + steps)
        label = f"{name}+{allocator}@{budget}" + (" chunked" if prefill == "chunked" else "")
        return _Run(label, prefill, budget, cache, session)

    with torch.no_grad():
        # untimed: first-call costs (allocator warm-up, kernel selection) must not land on the first setting
        model(input_ids=input_ids[:, : min(prompt_tokens, 64)], use_cache=False)
        factories = [lambda: _Run("full", "full", None, DynamicCache(config=model.config))]
        prompts = [input_ids]
        for budget in budgets:
            kept = min(int(Budget(budget).tokens(torch.tensor([prompt_tokens]))[0]), prompt_tokens)
            factories.append(lambda budget=budget, kept=kept: _Run(
                f"dense floor@{budget}", "floor", budget, DynamicCache(config=model.config), cache_tokens=kept))
            prompts.append(input_ids[:, -kept:])
            settings = [(scorer, allocator, "one_shot") for scorer in scorers for allocator in allocators]
            if chunk_size is not None and prompt_tokens > chunk_size and allocators:
                settings += [(scorer, allocators[0], "chunked") for scorer in scorers]
            for scorer, allocator, prefill in settings:
                factories.append(lambda s=(scorer, allocator, budget, prefill): compressed(*s))
                prompts.append(input_ids)
        seconds: list[list[float]] = [[] for _ in factories]
        scoring: list[list[float]] = [[] for _ in factories]
        for round_index in range(prefill_rounds):
            runs, run = [None] * len(factories), None  # the previous round's caches are freed before this round's
            # the full cache's prefill comes last in every round, and the other settings start one later each round.
            # At 8K on a 2-core CPU a compressed prefill run while the full cache of the same round was held took
            # 10-20% longer whichever allocator it used (uniform 28.0 / 25.8 s right after the full prefill, 22.7 /
            # 23.0 s otherwise; Ada-KV alike): fresh pages for its buffers (page faults; gone with glibc's mmap
            # threshold raised), which is not what compressing costs a user who holds no full cache
            others = list(range(1, len(factories)))
            for i in others[round_index % len(others):] + others[:round_index % len(others)] + [0]:
                factory, prompt = factories[i], prompts[i]
                run = factory()
                run.prefill(model, prompt)
                runs[i] = run
                seconds[i].append(run.prefill_seconds)
                if run.session is not None:
                    scoring[i].append(run.session.stats.score_seconds)
                if log and run.session is not None and round_index == prefill_rounds - 1:
                    log(f"  {run.label}: prefill {statistics.median(seconds[i]):.2f} s")
        for run, times, scored in zip(runs, seconds, scoring):
            run.prefill_seconds = statistics.median(times)
            if scored:
                run.score_seconds = statistics.median(scored)
        for run in runs:
            run.decode(model, warmup, timed=False)
        for count in per_round:
            for run in runs:
                run.decode(model, count, timed=True)
        results = [run.result(prompt_tokens) for run in runs]
    if log:
        for result in results:
            log(_progress_line(result))
    return results


def _resolve_scorers(scorers, model, heads_dtypes: tuple[str, ...] | None = None) -> list:
    """Names stay names; a directory holding a saved adapter becomes its heads for ``model`` (labelled by the
    directory's name), once per dtype of ``heads_dtypes`` (labelled ``name (dtype)``; None: as stored). Anything else
    is left to ``compress`` (which names an unknown scorer)."""
    from pathlib import Path

    from gatekv.heads.adapter import Adapter, heads_dtype

    for dtype in heads_dtypes or ():
        heads_dtype(dtype, "heads dtype")
    resolved = []
    for scorer in scorers:
        path = Path(scorer) if isinstance(scorer, (str, os.PathLike)) else None
        if path is not None and (path / "gatekv_config.json").is_file():
            adapter = Adapter.from_pretrained(path)
            if not heads_dtypes:
                resolved.append((path.name, adapter.heads_for(model)))
            for dtype in heads_dtypes or ():
                resolved.append((f"{path.name} ({dtype})", adapter.heads_for(model, dtype=dtype)))
        else:
            resolved.append(scorer)
    return resolved


def _progress_line(result: DecodeResult) -> str:
    return f"  {result.label}: prefill {result.prefill_seconds:.2f} s, decode {result.decode_ms:.2f} ms/token"


DECODE_COLUMNS = ("setting", "kept/head", "KV MiB", "KV x full", "decode ms", "x full", "x floor", "prefill s",
                  "prefill x full", "scoring x full prefill", "scoring / own prefill", "prefill ms/tok", "KV end MiB",
                  "KV end x floor")
"""Column headers of :func:`format_decode_table`, in order."""


def format_decode_table(results: list[DecodeResult], header: str = "") -> str:
    """A markdown table of ``results``: ratios against the first (full cache) row and, for compressed settings,
    decode time against the dense floor of the same budget. A floor's prefill is of its short prompt: no ratio."""
    full = results[0]
    floors = {r.budget: r for r in results if r.kind == "floor"}
    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(DECODE_COLUMNS) + " |", "|" + "---|" * len(DECODE_COLUMNS)]
    for r in results:
        kept = "all" if r.kept_per_head is None else f"{r.kept_per_head:.1f}"
        floor = floors.get(r.budget) if r.kind in ("one_shot", "chunked") else None
        vs_floor = f"{r.decode_ms / floor.decode_ms:.2f}" if floor is not None else "-"
        if r.kind == "floor":
            prefill_ratio, per_token = "-", r.prefill_seconds / max(r.cache_tokens or 1, 1) * 1e3
        else:
            prefill_ratio, per_token = f"{r.prefill_seconds / full.prefill_seconds:.2f}", r.prefill_seconds / r.prompt_tokens * 1e3
        cells = [
            r.label, kept, f"{r.kv_bytes / 2**20:.1f}", f"{r.kv_bytes / full.kv_bytes:.3f}", f"{r.decode_ms:.2f}",
            f"{r.decode_ms / full.decode_ms:.2f}", vs_floor, f"{r.prefill_seconds:.2f}", prefill_ratio,
            "-" if r.score_seconds is None else f"{r.score_seconds / full.prefill_seconds:.3f}",
            # against the same run's own prefill: no dependence on the one full-cache prefill's timing
            "-" if r.score_seconds is None else f"{r.score_seconds / r.prefill_seconds:.3f}",
            f"{per_token:.2f}", f"{r.kv_bytes_end / 2**20:.1f}",
            f"{r.kv_bytes_end / floor.kv_bytes_end:.3f}" if floor is not None and floor.kv_bytes_end else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_decode(
    length: int = 8192,
    budgets: tuple[float | int, ...] = (0.1,),
    steps: int = 32,
    device: str = "cpu",
    model_name: str | None = None,
    scorers: tuple[str, ...] = ("snapkv",),
    allocators: tuple[str, ...] = ("uniform", "adakv"),
    num_layers: int | None = None,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
    chunk_size: int | None = 512,
    print_fn=print,
    rounds: int = 4,
    prefill_rounds: int = 1,
    heads_dtypes: tuple[str, ...] | None = None,
) -> list[DecodeResult]:
    """Build the model and prompt for ``device``, run :func:`run_decode_benchmark` and print the table.

    model_name: ``smollm2`` (default on CPU: a needle prompt of ``length`` tokens) or ``llama8b-random`` (default on
                CUDA: random token ids); num_layers: only for ``llama8b-random``; threads: CPU threads for torch;
    chunk_size: tokens per chunk of the chunked-prefill settings (None: none measured).
    rounds:     interleaved rounds of the timed steps (see :func:`run_decode_benchmark`).
    prefill_rounds: interleaved repetitions of every prefill, medians reported (see :func:`run_decode_benchmark`).
    scorers:    registered scorer names, or directories of saved adapters (``gatekv_config.json`` inside), measured
                like a scorer and labelled by the directory's name.
    heads_dtypes: measure every adapter once per dtype named here (``float32``, ``bfloat16``, ...), labelled
                ``name (dtype)``; None: once, as stored.
    """
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if threads is not None:
        torch.set_num_threads(threads)
    model_name = model_name or ("llama8b-random" if target.type == "cuda" else "smollm2")
    if model_name == "smollm2":
        if num_layers is not None:
            raise ValueError("num_layers only applies to the llama8b-random model")
        model, tokenizer, input_ids = smollm2_needle(length, seed, target)
        description = f"SmolLM2-135M-Instruct ({model.dtype}), needle prompt"
    elif model_name == "llama8b-random":
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        model = random_llama(target, dtype, num_layers=num_layers, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(target)
        layers = model.config.num_hidden_layers
        description = f"random Llama-3.1-8B shape, {layers} layers ({dtype}), random tokens"
    else:
        raise ValueError(f"model_name must be 'smollm2' or 'llama8b-random', got {model_name!r}")

    if target.type == "cuda":
        device_name = torch.cuda.get_device_name(target)
    else:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        device_name = f"CPU, torch threads: {torch.get_num_threads()}, load average (1/5/15 min) at start: {load}"
    header = (
        f"decode benchmark: {description}; prompt {input_ids.shape[1]} tokens; {steps} timed steps (median) after "
        f"{warmup} warm-up, in {rounds} interleaved rounds"
        f"{f'; prefill: median of {prefill_rounds} interleaved rounds' if prefill_rounds > 1 else ''}"
        f"; device: {device_name}; torch {torch.__version__}"
    )
    print_fn(header)
    results = run_decode_benchmark(
        model, input_ids, tuple(budgets), tuple(_resolve_scorers(scorers, model, heads_dtypes)), tuple(allocators), steps, warmup, chunk_size=chunk_size,
        log=print_fn, rounds=rounds, prefill_rounds=prefill_rounds,
    )
    print_fn(format_decode_table(results))
    return results
