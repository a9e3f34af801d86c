"""Why head-wise (Ada-KV) decode sits a few % above the dense floor on CPU: one layer's decode attention over ragged
segments, timed for the library's flat path and the alternatives, against a dense SDPA call over the mean length.

SmolLM2-135M's shape (9 query heads, 3 KV heads, head dim 64), one batch row, segments laid out one after another with
``--room`` free slots each, in head order (the layout before ``torch_ragged.flat_order``) and in the order the cache
lays them out now (the flat path only). Per-layer lengths: equal (uniform), and Ada-KV-like splits of the same total.
Every variant is checked against the library's flat path first (an AssertionError above 1e-4).

    python benchmarks/flat_decode_variants.py --total 2463 --repeats 400
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, DIM = 9, 3, 64
GROUP = Q_HEADS // KV_HEADS


def _layout(lengths, room, ordered=False):
    """Segments one after another with ``room`` free slots each: in head order, or (``ordered``) in the order the
    cache lays them out (``torch_ragged.flat_order``)."""
    from gatekv.kernels import layout_from_caps
    from gatekv.kernels.torch_ragged import FlatDecodeMask, flat_order

    caps = [n + room for n in lengths]
    order = flat_order(caps, list(lengths), len(lengths)) if ordered else None
    starts = layout_from_caps(torch.tensor(caps), order)[0].tolist()
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(sum(caps), DIM, generator=gen), torch.randn(sum(caps), DIM, generator=gen)
    for start, n in zip(starts, lengths):  # each head's tokens are the same whatever the layout
        keys[start:start + n], values[start:start + n] = torch.randn(2, n, DIM, generator=gen)
    mask = FlatDecodeMask.build(torch.tensor(starts), torch.tensor(caps), torch.tensor(lengths), 1, KV_HEADS)
    return keys, values, starts, list(lengths), mask


def per_head_matmul(query, keys, values, starts, lengths, scale, mask):
    """One (scores, softmax, weighted sum) per KV head over exactly its segment."""
    q = query[0].reshape(KV_HEADS, GROUP, DIM)
    out = [torch.mm(torch.softmax(torch.mm(q[h], keys[s:s + n].t()).mul_(scale), -1), values[s:s + n])
           for h, (s, n) in enumerate(zip(starts, lengths))]
    return torch.cat(out).view(1, Q_HEADS, 1, DIM)


def per_head_sdpa(query, keys, values, starts, lengths, scale, mask):
    """One SDPA call per KV head over exactly its segment."""
    q = query.view(1, KV_HEADS, GROUP, DIM)
    out = [F.scaled_dot_product_attention(q[:, h:h + 1], keys[s:s + n][None, None], values[s:s + n][None, None],
                                          scale=scale) for h, (s, n) in enumerate(zip(starts, lengths))]
    return torch.cat(out, 1).view(1, Q_HEADS, 1, DIM)


def whole_row(query, keys, values, starts, lengths, scale, mask):
    """Every query head over the row's slots (read once), other heads' slots masked: 3x the arithmetic."""
    lo, width = mask.row_start[0], mask.row_width[0]
    k, v = keys[lo:lo + width], values[lo:lo + width]
    logits = torch.mm(query[0].reshape(Q_HEADS, DIM), k.t()).mul_(scale)
    logits.view(KV_HEADS, GROUP, width).add_(mask.bias[0, :, None, :width])
    return torch.mm(torch.softmax(logits, -1), v).view(1, Q_HEADS, 1, DIM)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total", type=int, default=2463, help="tokens kept over the 3 KV heads of a layer")
    parser.add_argument("--room", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gatekv.kernels.torch_ragged import _decode_flat

    def timed(fn) -> float:
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - start) / args.repeats * 1e6

    third = args.total // 3
    splits = {"equal (uniform)": [third, third, args.total - 2 * third],
              "Ada-KV-like 0.6/1.2/1.2": [int(0.2 * args.total), int(0.4 * args.total), args.total - int(0.6 * args.total)],
              "Ada-KV-like 0.4/1.6/1.0": [int(0.13 * args.total), int(0.54 * args.total), args.total - int(0.67 * args.total)]}
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(1, Q_HEADS, 1, DIM, generator=gen)
    scale = DIM**-0.5
    print(f"decode attention of one layer, SmolLM2 shape ({Q_HEADS} q / {KV_HEADS} KV heads, d {DIM}), {args.total} "
          f"kept tokens, room {args.room}; CPU threads {torch.get_num_threads()}; microseconds per call (mean of "
          f"{args.repeats})")
    print("| lengths | flat window / mean length, head order / as the cache lays it out | flat path, head order | "
          "flat path, as laid out | per-head matmuls | per-head SDPA | whole row | dense SDPA, mean length |")
    print("|---|---|---|---|---|---|---|---|")
    for name, lengths in splits.items():
        keys, values, starts, lengths, mask = _layout(lengths, args.room)
        window = mask.row_window(0, starts, lengths)[1]
        reference = _decode_flat(query, keys, values, starts, lengths, scale, mask)
        laid = _layout(lengths, args.room, ordered=True)
        laid_window = laid[4].row_window(0, laid[2], lengths)[1]
        diff = (_decode_flat(query, *laid[:2], laid[2], lengths, scale, laid[4]) - reference).abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"the flat path over the cache's layout differs from head order by {diff}")
        cells = []
        for fn in (_decode_flat, per_head_matmul, per_head_sdpa, whole_row):
            diff = (fn(query, keys, values, starts, lengths, scale, mask) - reference).abs().max().item()
            if diff > 1e-4:
                raise AssertionError(f"{fn.__name__} differs from the flat path by {diff}")
            cells.append(timed(lambda: fn(query, keys, values, starts, lengths, scale, mask)))
        cells.insert(1, timed(lambda: _decode_flat(query, *laid[:2], laid[2], lengths, scale, laid[4])))
        mean = sum(lengths) // KV_HEADS
        k, v = torch.randn(1, KV_HEADS, mean, DIM, generator=gen), torch.randn(1, KV_HEADS, mean, DIM, generator=gen)
        dense = timed(lambda: F.scaled_dot_product_attention(query, k, v, enable_gqa=True))
        print(f"| {name} {lengths} | {window / mean:.2f} / {laid_window / mean:.2f} | "
              + " | ".join(f"{c:.1f}" for c in cells) + f" | {dense:.1f} |")


if __name__ == "__main__":
    main()
