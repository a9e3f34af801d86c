"""How much longer the flat decode path's windows are than the segments they cover, on a real Ada-KV cache.

Compresses a SmolLM2 needle prompt with SnapKV + Ada-KV, decodes one token, and sums over layers the flat path's
window length x KV heads (``torch_ragged._window``) against the kept tokens; also what laying each row's segments out
longest first would give.

    python benchmarks/flat_window_waste.py --length 8192
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--budget", type=float, default=0.1)
    args = parser.parse_args(argv)

    from gatekv.bench import _Run, smollm2_needle
    from gatekv.compress import CompressionSession
    from gatekv.kernels.torch_ragged import _window

    model, _, ids = smollm2_needle(args.length)
    session = CompressionSession(model, scorer="snapkv", allocator="adakv", budget=args.budget)
    cache = session.new_cache()
    session.expect_new_tokens(2)
    run = _Run("adakv", "one_shot", args.budget, cache, session)
    with torch.no_grad():
        run.prefill(model, ids)
        run.decode(model, 1, timed=False)
    kept = windows = longest_first = 0
    for layer in cache.layers:
        starts, lengths, caps = layer.starts.tolist(), layer.lengths.tolist(), layer.caps.tolist()
        lo = starts[0]
        width = max(s + c for s, c in zip(starts, caps)) - lo
        _, length = _window([s - lo for s in starts], [s + n - lo for s, n in zip(starts, lengths)], width)
        kept, windows = kept + sum(lengths), windows + length * len(lengths)
        order = sorted(range(len(caps)), key=lambda h: -caps[h])
        sorted_starts = [sum(caps[h] for h in order[:i]) for i in range(len(order))]
        _, length = _window(sorted_starts, [s + lengths[h] for s, h in zip(sorted_starts, order)], width)
        longest_first += length * len(lengths)
    print(f"{ids.shape[1]} tokens, SnapKV + Ada-KV at {args.budget}: kept {kept} slots over the layers; flat windows "
          f"{windows} ({windows / kept:.2f}x); segments longest first {longest_first} ({longest_first / kept:.2f}x)")


if __name__ == "__main__":
    main()
