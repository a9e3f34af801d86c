"""How much longer the flat decode path's windows are than the segments they cover, on a real Ada-KV cache.

Compresses a SmolLM2 needle prompt with SnapKV + Ada-KV, decodes one token, and sums over layers the flat path's
window length x KV heads (``torch_ragged._window``) against the kept tokens: as the cache lays the segments out
(``torch_ragged.flat_order``), in head order (the layout before flat_order), longest first, and the least any order
can give (KV heads x the longest segment).

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
    from gatekv.kernels.torch_ragged import window_in_order as window

    model, _, ids = smollm2_needle(args.length)
    session = CompressionSession(model, scorer="snapkv", allocator="adakv", budget=args.budget)
    cache = session.new_cache()
    session.expect_new_tokens(2)
    run = _Run("adakv", "one_shot", args.budget, cache, session)
    with torch.no_grad():
        run.prefill(model, ids)
        run.decode(model, 1, timed=False)
    kept = laid_out = head_order = longest_first = bound = 0
    for layer in cache.layers:
        starts, lengths, caps = layer.starts.tolist(), layer.lengths.tolist(), layer.caps.tolist()
        heads = len(lengths)
        kept += sum(lengths)
        laid_out += heads * window(caps, lengths, sorted(range(heads), key=lambda h: starts[h]))
        head_order += heads * window(caps, lengths, list(range(heads)))
        longest_first += heads * window(caps, lengths, sorted(range(heads), key=lambda h: -caps[h]))
        bound += heads * max(lengths)
    print(f"{ids.shape[1]} tokens, SnapKV + Ada-KV at {args.budget}: kept {kept} slots over the layers; flat windows "
          f"as laid out {laid_out} ({laid_out / kept:.2f}x); head order {head_order / kept:.2f}x; longest first "
          f"{longest_first / kept:.2f}x; least possible (heads x longest) {bound / kept:.2f}x")

if __name__ == "__main__":
    main()
