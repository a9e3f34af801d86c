"""compact and append: bit-exact equality with the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _kernel_cases import DEVICE  # noqa: E402

from gatekv.kernels import reference  # noqa: E402
from gatekv.kernels import triton_kernels as tk  # noqa: E402
from gatekv.kernels.reference import layout_from_caps  # noqa: E402


def _compact_case(num_batch, num_kv_heads, head_dim, dtype, seed, extra_buffers=False):
    """Source storage, keep plan and destination layout; segment 0 keeps nothing, segment 1 is full."""
    gen = torch.Generator().manual_seed(seed)
    num_segments = num_batch * num_kv_heads
    src_caps = torch.randint(1, 40, (num_segments,), generator=gen)
    lengths = (src_caps * torch.rand(num_segments, generator=gen)).long()
    lengths[min(1, num_segments - 1)] = src_caps[min(1, num_segments - 1)]  # a full source segment
    counts = (lengths * torch.rand(num_segments, generator=gen)).long()
    counts[0] = 0
    counts[min(1, num_segments - 1)] = lengths[min(1, num_segments - 1)]  # keep everything: full capacity
    k_max = int(counts.max()) + 3  # ranks >= counts hold garbage and must be ignored
    indices = torch.randint(0, 1000, (num_segments, k_max), generator=gen)
    for s in range(num_segments):
        indices[s, : counts[s]] = torch.randperm(int(lengths[s]), generator=gen)[: counts[s]].sort().values
    dst_caps = counts + torch.randint(0, 5, (num_segments,), generator=gen)
    dst_caps[min(1, num_segments - 1)] = counts[min(1, num_segments - 1)]  # no growth room
    src_starts, src_rows = layout_from_caps(src_caps)
    dst_starts, dst_rows = layout_from_caps(dst_caps)
    buffers = [
        torch.randn(src_rows, head_dim, generator=gen).to(dtype),
        torch.randn(src_rows, head_dim, generator=gen).to(dtype),
        torch.randint(-1, 10_000, (src_rows,), generator=gen),
    ]
    fill = [0.0, 0.0, -1]
    if extra_buffers:  # per-slot scorer state: odd feature shapes and dtypes
        buffers.append(torch.randn(src_rows, 3, 2, generator=gen))
        buffers.append(torch.rand(src_rows, generator=gen) > 0.5)
        fill += [1.5, True]
    meta = [src_starts, indices, counts, dst_starts]
    return buffers, [m.to(DEVICE) for m in meta], dst_rows, fill


def _assert_equal_lists(got, expected):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"buffer {i}"
        assert torch.equal(a.cpu(), b.cpu()), f"buffer {i} differs"


@pytest.mark.parametrize(
    "num_batch, num_kv_heads, head_dim, dtype, block_k, extra",
    [
        (1, 1, 32, torch.float32, 64, False),
        (3, 2, 64, torch.bfloat16, 16, True),
        (1, 4, 128, torch.float16, 64, False),
        (3, 4, 32, torch.bfloat16, 64, False),
        (3, 1, 128, torch.float32, 16, False),
    ],
)
def test_compact_matches_reference(num_batch, num_kv_heads, head_dim, dtype, block_k, extra):
    buffers, meta, dst_rows, fill = _compact_case(num_batch, num_kv_heads, head_dim, dtype, seed=head_dim,
                                                  extra_buffers=extra)
    buffers = [b.to(DEVICE) for b in buffers]
    got = tk.compact(buffers, *meta, dst_rows, fill, block_k=block_k)
    _assert_equal_lists(got, reference.compact_reference(buffers, *meta, dst_rows, fill))


def test_compact_non_contiguous_and_default_fill():
    buffers, meta, dst_rows, _ = _compact_case(2, 2, 64, torch.bfloat16, seed=7)
    keys = buffers[0].t().contiguous().t().to(DEVICE)  # column-major (N, d)
    values = torch.cat([buffers[1], buffers[1]], 1).to(DEVICE)[:, ::2]  # strided features
    positions = torch.stack([buffers[2], buffers[2]], 1).to(DEVICE)[:, 1]  # row stride 2
    src_starts, indices, counts, dst_starts = meta
    indices = indices.t().contiguous().t()
    args = ([keys, values, positions], src_starts, indices, counts, dst_starts, dst_rows)
    _assert_equal_lists(tk.compact(*args), reference.compact_reference(*args))


def test_compact_unordered_destination_and_empty_plans():
    buffers, (src_starts, indices, counts, dst_starts), dst_rows, fill = _compact_case(1, 4, 32, torch.float32, 3)
    buffers = [b.to(DEVICE) for b in buffers]
    # segments laid out in reverse order with a gap in front: the output is pre-filled instead
    dst_caps = counts + 2
    reversed_starts = (torch.cumsum(dst_caps.flip(0), 0) - dst_caps.flip(0)).flip(0) + 5
    rows = int(dst_caps.sum()) + 5
    args = (buffers, src_starts, indices, counts, reversed_starts, rows, fill)
    _assert_equal_lists(tk.compact(*args), reference.compact_reference(*args))
    # nothing kept anywhere: K_max = 0
    none = indices[:, :0]
    zero = torch.zeros_like(counts)
    args = (buffers, src_starts, none, zero, dst_starts, dst_rows, fill)
    _assert_equal_lists(tk.compact(*args), reference.compact_reference(*args))
    # no segments at all
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    args = (buffers, empty, empty.reshape(0, 0), empty, empty, 6, fill)
    _assert_equal_lists(tk.compact(*args), reference.compact_reference(*args))


def _append_case(num_batch, num_kv_heads, head_dim, q_len, seed):
    gen = torch.Generator().manual_seed(seed)
    num_segments = num_batch * num_kv_heads
    caps = torch.randint(q_len, 30, (num_segments,), generator=gen)
    lengths = ((caps - q_len) * torch.rand(num_segments, generator=gen)).long()
    lengths[0] = 0  # empty segment
    lengths[-1] = caps[-1] - q_len  # fills the segment to capacity
    starts, rows = layout_from_caps(caps)
    return caps, starts.to(DEVICE), lengths.to(DEVICE), rows, gen


@pytest.mark.parametrize(
    "num_batch, num_kv_heads, head_dim, q_len, dtype, new_dtype",
    [
        (1, 1, 32, 1, torch.float32, torch.float32),
        (3, 2, 64, 1, torch.bfloat16, torch.bfloat16),
        (1, 4, 128, 5, torch.float16, torch.float32),  # converted as the reference converts
        (3, 4, 32, 3, torch.bfloat16, torch.float32),
    ],
)
def test_append_matches_reference(num_batch, num_kv_heads, head_dim, q_len, dtype, new_dtype):
    _, starts, lengths, rows, gen = _append_case(num_batch, num_kv_heads, head_dim, q_len, seed=head_dim + q_len)
    num_segments = starts.numel()
    keys = torch.randn(rows, head_dim, generator=gen).to(dtype)
    values = torch.randn(rows, head_dim, generator=gen).to(dtype)
    positions = torch.full((rows,), -1, dtype=torch.int64)
    new = [
        torch.randn(num_segments, q_len, head_dim, generator=gen).to(new_dtype),
        torch.randn(num_segments, q_len, head_dim, generator=gen).to(new_dtype),
        torch.randint(0, 100, (num_segments, q_len), generator=gen),
    ]
    new = [t.to(DEVICE) for t in new]
    got = [t.clone().to(DEVICE) for t in (keys, values, positions)]
    expected = [t.clone().to(DEVICE) for t in (keys, values, positions)]
    tk.append(got, starts, lengths, new)
    reference.append_reference(expected, starts, lengths, new)
    _assert_equal_lists(got, expected)


def test_append_non_contiguous_inputs_and_odd_features():
    _, starts, lengths, rows, gen = _append_case(2, 2, 64, 2, seed=11)
    num_segments = starts.numel()
    wide = torch.randn(rows, 128, generator=gen).to(torch.bfloat16).to(DEVICE)
    keys = wide[:, :64]  # row stride 128: a view of a bigger buffer, written in place
    state = torch.randn(rows, 3, 2, generator=gen).to(DEVICE)
    new_keys = torch.randn(2, num_segments, 64, generator=gen).to(torch.bfloat16).to(DEVICE).transpose(0, 1)
    new_state = torch.randn(num_segments, 2, 3, 2, generator=gen).to(DEVICE)
    expected_wide, expected_state = wide.clone(), state.clone()
    tk.append([keys, state], starts, lengths, [new_keys, new_state])
    reference.append_reference([expected_wide[:, :64], expected_state], starts, lengths, [new_keys, new_state])
    _assert_equal_lists([wide, state], [expected_wide, expected_state])


def test_append_zero_tokens_is_a_no_op():
    _, starts, lengths, rows, gen = _append_case(1, 2, 32, 1, seed=5)
    keys = torch.randn(rows, 32, generator=gen).to(DEVICE)
    before = keys.clone()
    tk.append([keys], starts, lengths, [torch.zeros(2, 0, 32, device=DEVICE)])
    assert torch.equal(keys, before)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    keep=st.floats(0.0, 1.0),
    growth=st.integers(0, 3),
    head_dim=st.sampled_from([1, 24, 32]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    q_len=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_compact_then_append_property(lengths, keep, growth, head_dim, dtype, q_len, seed):
    """Random ragged plans: compact with growth room, then append into it; both bit-exact."""
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    src_starts, src_rows = layout_from_caps(lengths_t)
    counts = (lengths_t * keep).long()
    k_max = int(counts.max())
    indices = torch.zeros(len(lengths), k_max, dtype=torch.int64)
    for s, n in enumerate(lengths):
        indices[s, : counts[s]] = torch.randperm(n, generator=gen)[: counts[s]].sort().values
    dst_starts, dst_rows = layout_from_caps(counts + growth + q_len)
    buffers = [torch.randn(src_rows, head_dim, generator=gen).to(dtype), torch.arange(src_rows)]
    meta = [t.to(DEVICE) for t in (src_starts, indices, counts, dst_starts)]
    buffers = [b.to(DEVICE) for b in buffers]
    got = tk.compact(buffers, *meta, dst_rows, [0.0, -1], block_k=16)
    expected = reference.compact_reference(buffers, *meta, dst_rows, [0.0, -1])
    _assert_equal_lists(got, expected)
    new = [torch.randn(len(lengths), q_len, head_dim, generator=gen).to(DEVICE),
           torch.randint(0, 99, (len(lengths), q_len), generator=gen).to(DEVICE)]
    tk.append(got, meta[3], meta[2], new)
    reference.append_reference(expected, meta[3], meta[2], new)
    _assert_equal_lists(got, expected)
