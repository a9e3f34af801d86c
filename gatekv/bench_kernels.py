"""Benchmark of the ragged KV-cache kernels: compact, append, decode attention.

On a CUDA device (Llama-3.1-8B attention shape: 32 query heads, 8 KV heads, d = 128, bf16; contexts 8K / 32K /
128K; a 10% budget split across heads with Ada-KV-like skew) it prints, per context:

- effective bandwidth of compact, append and decode as a fraction of ``torch`` device-to-device copy bandwidth
  measured in the same run (a large copy: the device's practical peak; and a copy of the same bytes);
- the decode step time against full-cache SDPA and against full cache + mask (what kvpress does), same run.

Targets (issue 4): compact >= 80% and decode >= 70% of copy bandwidth at 32K; decode at 32K/10% <= 0.25x the
full-cache step. Times come from ``triton.testing.do_bench`` (L2 flushed between runs, median).

Without a GPU it runs a small shape through Triton's interpreter against the PyTorch reference (correctness
only) and says so.

    gatekv bench kernels [--contexts 8192 32768 131072] [--budget 0.1] [--batch 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from gatekv.kernels import dispatch, reference
from gatekv.kernels.reference import layout_from_caps

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
GROWTH = 256  # decode room per segment after compaction


def skewed_lengths(total: int, num_heads: int, cap: int, generator: torch.Generator) -> torch.Tensor:
    """Per-head kept lengths summing to about ``total`` with Ada-KV-like skew (log-normal head weights).

    Every head keeps between 16 and ``cap`` tokens; what clamping removes is spread over the other heads.
    """
    weights = torch.exp(torch.randn(num_heads, generator=generator, dtype=torch.float64))
    lengths = (weights / weights.sum() * total).clamp(16, cap)
    for _ in range(20):
        free = (lengths > 16) & (lengths < cap)
        excess = total - lengths.sum()
        if abs(excess) < 1 or not free.any():
            break
        lengths[free] += excess * lengths[free] / lengths[free].sum()
        lengths = lengths.clamp(16, cap)
    return lengths.round().long()


def build(batch: int, context: int, budget: float, device, dtype, seed: int = 0) -> dict:
    """Full cache (one segment per (row, KV head), context rows each) and a keep plan with skewed lengths."""
    gen = torch.Generator().manual_seed(seed)
    num_segments = batch * NUM_KV_HEADS
    src_caps = torch.full((num_segments,), context, dtype=torch.int64)
    src_starts, src_rows = layout_from_caps(src_caps)
    counts = torch.cat([skewed_lengths(int(budget * context * NUM_KV_HEADS), NUM_KV_HEADS, context, gen)
                        for _ in range(batch)])
    k_max = int(counts.max())
    # kept slots: random subsets (the last 32 tokens always kept, an observation window), sorted per segment
    scores = torch.rand(num_segments, context, generator=gen)
    scores[:, -32:] = 2.0
    best = scores.topk(k_max, dim=1).indices
    indices = torch.zeros(num_segments, k_max, dtype=torch.int64)
    for s, kept in enumerate(counts.tolist()):
        indices[s, :kept] = best[s, :kept].sort().values
    dst_starts, dst_rows = layout_from_caps(counts + GROWTH)
    keys = torch.randn(src_rows, HEAD_DIM, generator=gen).to(dtype)
    values = torch.randn(src_rows, HEAD_DIM, generator=gen).to(dtype)
    positions = torch.arange(context).repeat(num_segments)
    to = lambda t: t.to(device)  # noqa: E731
    return dict(
        keys=to(keys), values=to(values), positions=to(positions), src_starts=to(src_starts),
        indices=to(indices), counts=to(counts), dst_starts=to(dst_starts), dst_rows=dst_rows,
        query=to(torch.randn(batch, NUM_Q_HEADS, 1, HEAD_DIM, generator=gen).to(dtype)),
        query_positions=torch.full((batch, 1), context, device=device),
        new_keys=to(torch.randn(num_segments, 1, HEAD_DIM, generator=gen).to(dtype)),
    )


def timer(device):
    """Median milliseconds of a callable: do_bench on CUDA (L2 flushed), a wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        fn()
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return sorted(runs)[1] * 1e3

    return wall


def run_context(case: dict, bench, copy_peak_gbs: float, device, dtype) -> dict:
    """Time compact, append, decode and the SDPA baselines for one context; bytes moved per op."""
    row_bytes = HEAD_DIM * torch.finfo(dtype).bits // 8
    counts = case["counts"]
    kept = int(counts.sum())
    dst_rows = case["dst_rows"]
    num_segments = counts.numel()
    src = [case["keys"], case["values"], case["positions"]]
    compact_args = (src, case["src_starts"], case["indices"], counts, case["dst_starts"], dst_rows, [0, 0, -1])
    keys, values, positions = dispatch.compact(*compact_args)
    lengths = counts.clone()
    results = {}

    def record(name, ms, nbytes):
        copy_buf = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
        copy_dst = torch.empty_like(copy_buf)
        copy_ms = bench(lambda: copy_dst.copy_(copy_buf))
        gbs = nbytes / ms / 1e6
        results[name] = dict(ms=ms, bytes=nbytes, gbs=gbs, frac_peak_copy=gbs / copy_peak_gbs,
                             frac_same_size_copy=gbs / (nbytes / copy_ms / 1e6))

    # compact: read the kept rows, write the whole destination (kept rows + growth room filled)
    record("compact", bench(lambda: dispatch.compact(*compact_args)),
           kept * (2 * row_bytes + 8) + dst_rows * (2 * row_bytes + 8) + case["indices"].numel() * 8)
    # append one decoded token per segment (keys, values, positions) at the end of each segment
    new = [case["new_keys"], case["new_keys"], torch.zeros(num_segments, 1, dtype=torch.int64, device=device)]
    record("append", bench(lambda: dispatch.append([keys, values, positions], case["dst_starts"], lengths, new)),
           2 * num_segments * (2 * row_bytes + 8))
    # decode: one query token per row over the compacted cache
    query, query_positions = case["query"], case["query_positions"]
    scale = HEAD_DIM**-0.5
    decode = lambda: dispatch.ragged_attention(  # noqa: E731
        query, query_positions, keys, values, positions, case["dst_starts"], lengths, scale)
    record("decode", bench(decode), kept * (2 * row_bytes + 8) + 2 * query.numel() * query.element_size())
    got = decode()
    expected = reference.ragged_attention_reference(query, query_positions, keys, values, positions,
                                                    case["dst_starts"], lengths, scale)
    results["decode"]["max_abs_error_vs_reference"] = (got.float() - expected.float()).abs().max().item()

    # baselines: the full cache (B, H_kv, T, d) with SDPA, and full cache + mask of the evicted tokens
    batch = query.shape[0]
    context = case["keys"].shape[0] // num_segments
    full_k = case["keys"].view(batch, NUM_KV_HEADS, context, HEAD_DIM)
    full_v = case["values"].view(batch, NUM_KV_HEADS, context, HEAD_DIM)
    group_q = query.view(batch, NUM_KV_HEADS, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM)  # G heads as G query rows
    valid = torch.arange(case["indices"].shape[1], device=device) < counts[:, None]
    keep_mask = torch.zeros(num_segments, context + 1, dtype=torch.bool, device=device)  # last column: padding
    keep_mask.scatter_(1, torch.where(valid, case["indices"], context), True)
    keep_mask = keep_mask[:, :context].reshape(batch, NUM_KV_HEADS, 1, context)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    results["sdpa_full_ms"] = bench(lambda: sdpa(group_q, full_k, full_v, scale=scale))
    results["sdpa_full_mask_ms"] = bench(lambda: sdpa(group_q, full_k, full_v, attn_mask=keep_mask, scale=scale))
    results["decode_vs_full"] = results["decode"]["ms"] / results["sdpa_full_ms"]
    results["decode_vs_full_mask"] = results["decode"]["ms"] / results["sdpa_full_mask_ms"]
    if device.type == "cuda":  # the Triton decode path has no host sync: it can be captured in a CUDA graph
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                decode()
            results["decode_graph_ms"] = bench(graph.replay)
        except Exception as error:  # noqa: BLE001 - report, do not fail the benchmark
            results["decode_graph_ms"] = f"capture failed: {error}"
    results["lengths"] = dict(min=int(counts.min()), max=int(counts.max()), kept=kept, context=context)
    return results


def gpu_main(args) -> dict:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    bench = timer(device)
    big = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    big_dst = torch.empty_like(big)
    copy_peak_gbs = 2 * big.numel() / bench(lambda: big_dst.copy_(big)) / 1e6
    del big, big_dst
    import triton

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  copy_peak_gbs=copy_peak_gbs, shape=dict(h_q=NUM_Q_HEADS, h_kv=NUM_KV_HEADS, d=HEAD_DIM,
                                                         dtype="bf16", batch=args.batch, budget=args.budget),
                  contexts={})
    print(f"device: {report['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy bandwidth (512 MiB device-to-device, read + write): {copy_peak_gbs:.0f} GB/s")
    print(f"shape: B={args.batch} H_q={NUM_Q_HEADS} H_kv={NUM_KV_HEADS} d={HEAD_DIM} bf16, budget {args.budget:.0%}")
    header = f"{'context':>8} {'op':>8} {'time us':>9} {'GB/s':>7} {'% peak copy':>12} {'% same-size copy':>17}"
    print(header)
    for context in args.contexts:
        case = build(args.batch, context, args.budget, device, dtype)
        res = run_context(case, bench, copy_peak_gbs, device, dtype)
        report["contexts"][context] = res
        for op in ("compact", "append", "decode"):
            r = res[op]
            print(f"{context:>8} {op:>8} {r['ms'] * 1e3:>9.1f} {r['gbs']:>7.0f} {r['frac_peak_copy']:>12.0%} "
                  f"{r['frac_same_size_copy']:>17.0%}")
        graph = res.get("decode_graph_ms")
        graph_text = f"{graph * 1e3:.1f} us" if isinstance(graph, float) else graph
        print(f"{context:>8} decode {res['decode']['ms'] * 1e3:.1f} us (CUDA graph: {graph_text}) | full-cache SDPA "
              f"{res['sdpa_full_ms'] * 1e3:.1f} us -> {res['decode_vs_full']:.2f}x | full cache + mask "
              f"{res['sdpa_full_mask_ms'] * 1e3:.1f} us -> {res['decode_vs_full_mask']:.2f}x | kept lengths "
              f"{res['lengths']['min']}..{res['lengths']['max']} | max |err| vs reference "
              f"{res['decode']['max_abs_error_vs_reference']:.2e}")
    if 32768 in report["contexts"]:
        r = report["contexts"][32768]
        print(f"targets at 32K: compact {r['compact']['frac_peak_copy']:.0%} (>= 80%), decode "
              f"{r['decode']['frac_peak_copy']:.0%} (>= 70%), decode/full {r['decode_vs_full']:.2f} (<= 0.25)")
    return report


def cpu_main(args) -> dict:
    """No GPU: a small shape through the Triton interpreter against the reference (correctness, not speed)."""
    global NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM
    NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 64
    device = torch.device("cpu")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    print("no CUDA device: no bandwidth figures. Running a small shape (B=1, H_q=8, H_kv=2, d=64, context 512, "
          f"budget {args.budget:.0%}) {'through the Triton interpreter' if interpreted else 'on the reference'} "
          "against the PyTorch reference, for correctness only.")
    report = dict(device="cpu", interpreter=interpreted, contexts={})
    for dtype in (torch.float32, torch.bfloat16):
        case = build(1, 512, args.budget, device, dtype)
        src = [case["keys"], case["values"], case["positions"]]
        meta = (case["src_starts"], case["indices"], case["counts"], case["dst_starts"], case["dst_rows"], [0, 0, -1])
        t0 = time.perf_counter()
        got = dispatch.compact(src, *meta)
        compact_s = time.perf_counter() - t0
        expected = reference.compact_reference(src, *meta)
        compact_equal = all(torch.equal(a, b) for a, b in zip(got, expected))
        new = [case["new_keys"], case["new_keys"], torch.full((NUM_KV_HEADS, 1), 512)]
        lengths = case["counts"]
        dispatch.append(got, case["dst_starts"], lengths, new)
        reference.append_reference(expected, case["dst_starts"], lengths, new)
        append_equal = all(torch.equal(a, b) for a, b in zip(got, expected))
        lengths = lengths + 1
        args_attn = (case["query"], case["query_positions"], *got, case["dst_starts"], lengths, HEAD_DIM**-0.5)
        t0 = time.perf_counter()
        out = dispatch.ragged_attention(*args_attn)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = reference.ragged_attention_reference(*args_attn)
        ref_s = time.perf_counter() - t0
        error = (out.float() - ref.float()).abs().max().item()
        name = str(dtype).replace("torch.", "")
        report["contexts"][name] = dict(compact_equal=compact_equal, append_equal=append_equal,
                                        decode_max_abs_error=error, compact_s=compact_s, decode_s=decode_s,
                                        reference_decode_s=ref_s)
        note = " (one bf16 ulp: the interpreter truncates to bf16)" if dtype == torch.bfloat16 and error else ""
        print(f"{name:>9}: compact bit-exact {compact_equal}, append bit-exact {append_equal}, decode max |error| "
              f"{error:.2e}{note} (kept lengths {int(case['counts'].min())}..{int(case['counts'].max())}); wall time "
              f"compact {compact_s * 1e3:.0f} ms, decode {decode_s * 1e3:.0f} ms (reference {ref_s * 1e3:.1f} ms; "
              "the interpreter is not a speed measurement)")
    # the GPU measurement pipeline (baselines included) on the same small shape, wall clock: a smoke run only
    res = run_context(build(1, 512, args.budget, device, torch.float32), timer(device), 1.0, device, torch.float32)
    report["pipeline_smoke"] = res
    print(f"pipeline smoke run (CPU wall clock, not a measurement): decode {res['decode']['ms']:.0f} ms, "
          f"full-cache SDPA {res['sdpa_full_ms']:.2f} ms, full cache + mask {res['sdpa_full_mask_ms']:.2f} ms")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--budget", type=float, default=0.1, help="kept fraction of the context per row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        # The Triton kernels are imported lazily by the dispatch, so this still takes effect here.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report = gpu_main(args) if torch.cuda.is_available() else cpu_main(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
