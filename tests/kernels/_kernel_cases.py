"""Random ragged caches and tolerance checks shared by the kernel tests."""

from __future__ import annotations

import torch

from gatekv.kernels.reference import layout_from_caps

# CPU tensors go through Triton's interpreter (see conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerance table for arithmetic kernels, against the reference computed in fp32 on the same (upcast) inputs.
#   fp32 inputs:             atol = rtol = 1e-5
#   fp16 inputs:             atol = rtol = 2e-3 (relative to the output scale, about 1)
#   bf16 inputs, bf16 output: flash-attention's rule, max error <= 2 x the max error of PyTorch computing the
#                            same attention in bf16 (matmuls in bf16) + 1e-5; a bf16 output cannot meet 2e-3
#                            relative (one bf16 ulp is 7.8e-3)
#   bf16 inputs, fp32 output: atol = rtol = 2e-3
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def ragged_cache(
    lengths: list[int],
    caps: list[int],
    head_dim: int,
    value_dim: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    holes: bool = True,
) -> dict[str, torch.Tensor]:
    """Flat storage with segment ``s`` holding ``lengths[s]`` tokens in ``caps[s]`` rows.

    Positions of a segment increase with gaps (a compressed cache); with ``holes`` the first slot of every
    segment longer than 2 is left padding (-1). Growth rows hold garbage keys and position -1.
    """
    caps_t = torch.tensor(caps, dtype=torch.int64)
    starts, rows = layout_from_caps(caps_t)
    keys = torch.randn(rows, head_dim, generator=generator).to(dtype)
    values = torch.randn(rows, value_dim, generator=generator).to(dtype)
    positions = torch.full((rows,), -1, dtype=torch.int64)
    for s, length in enumerate(lengths):
        gaps = torch.randint(1, 4, (length,), generator=generator)
        start = int(starts[s])
        positions[start : start + length] = torch.cumsum(gaps, 0) - 1
        if holes and length > 2:
            positions[start] = -1
    return dict(
        keys=keys.to(DEVICE), values=values.to(DEVICE), positions=positions.to(DEVICE),
        starts=starts.to(DEVICE), lengths=torch.tensor(lengths, dtype=torch.int64, device=DEVICE),
    )


def low_precision_attention(query, keys, values, allowed, scale, dtype):
    """PyTorch attention with the matmuls in ``dtype`` (flash-attention's 'same precision' baseline).

    query (G, q, d), keys (L, d), values (L, d_v), allowed (q, L) bool -> (G, q, d_v) float32
    """
    logits = torch.matmul(query.to(dtype), keys.to(dtype).t()).float() * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, -1), nan=0.0).to(dtype)
    return torch.matmul(weights, values.to(dtype)).float()


def assert_within(name: str, got: torch.Tensor, expected32: torch.Tensor, dtype: torch.dtype,
                  low_precision: torch.Tensor | None = None) -> None:
    """Check ``got`` against the fp32 reference ``expected32`` with the table above."""
    got = got.float()
    if low_precision is not None:
        ours = (got - expected32).abs().max().item()
        torch_error = (low_precision - expected32).abs().max().item()
        assert ours <= 2 * torch_error + 1e-5, f"{name}: error {ours:.3g} > 2 x torch {dtype} error {torch_error:.3g}"
    if low_precision is None or dtype != torch.bfloat16:
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(got, expected32, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
