"""Triton merge kernel vs the PyTorch reference (interpreter on CPU, compiled on CUDA): odd sizes, empty, bf16."""

from __future__ import annotations

import pytest
import torch

from gatekv.kernels.reference import layout_from_caps, merge_reference

triton_kernels = pytest.importorskip("gatekv.kernels.triton_kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed, segments, d, e_max, dtype):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (segments,), generator=g)
    src_starts, src_rows = layout_from_caps(lengths)
    kept = torch.minimum(torch.randint(0, 6, (segments,), generator=g), lengths)
    dst_starts, dst_rows = layout_from_caps(kept + 1)
    sources = torch.stack([torch.randint(0, int(n), (e_max,), generator=g) for n in lengths]) if e_max else torch.zeros(segments, 0, dtype=torch.long)
    targets = torch.stack([torch.randint(0, max(int(k), 1), (e_max,), generator=g) for k in kept]) if e_max else torch.zeros(segments, 0, dtype=torch.long)
    counts = torch.where(kept > 0, torch.randint(0, e_max + 1, (segments,), generator=g), torch.zeros_like(kept))
    weights = torch.rand(segments, e_max, generator=g)
    src = [torch.randn(src_rows, d, generator=g).to(dtype), torch.randn(src_rows, d + 3, generator=g).to(dtype)]
    dst = [torch.randn(dst_rows, d, generator=g).to(dtype), torch.randn(dst_rows, d + 3, generator=g).to(dtype)]
    move = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(dst=[move(t) for t in dst], dst_starts=move(dst_starts), src=[move(t) for t in src],
                src_starts=move(src_starts), sources=move(sources), targets=move(targets), weights=move(weights),
                source_counts=move(counts))


@pytest.mark.parametrize("segments, d, e_max", [(1, 8, 1), (7, 5, 13), (3, 64, 70), (4, 16, 0)])
def test_merge_kernel_matches_reference_fp32(segments, d, e_max):
    case = _case(segments + d, segments, d, e_max, torch.float32)
    expected = [t.clone() for t in case["dst"]]
    merge_reference(**{**case, "dst": expected})
    triton_kernels.merge(**case)
    for got, want in zip(case["dst"], expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_kernel_bf16_within_twice_torch_error():
    case = _case(11, 5, 32, 9, torch.bfloat16)
    exact = [t.double() for t in case["dst"]]
    merge_reference(**{**case, "dst": exact, "src": [t.double() for t in case["src"]]})
    torch_low = [t.clone() for t in case["dst"]]
    merge_reference(**{**case, "dst": torch_low})
    triton_kernels.merge(**case)
    for got, low, want in zip(case["dst"], torch_low, exact):
        torch_error = (low.double() - want).abs().max()
        assert float((got.double() - want).abs().max()) <= 2 * float(torch_error) + 1e-6
