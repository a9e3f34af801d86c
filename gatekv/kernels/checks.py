"""Argument checks of the ragged KV-cache kernels: shapes, dtypes and devices, ``ValueError`` naming the argument.

Run once per call, by ``dispatch`` (whichever backend then runs) or by a Triton function called directly; no host
synchronisation. Shapes: see ``reference.py``.
"""

from __future__ import annotations

import numbers
import operator

import torch

__all__ = [
    "check_append",
    "check_column_max_logits",
    "check_compact",
    "check_evict_in_place",
    "check_host_layout",
    "check_merge",
    "check_ragged_attention",
    "check_same_device",
    "check_scale",
    "check_segments",
    "check_shape",
    "check_tensor",
    "check_window_attention",
]


def check_tensor(name: str, value, dims: tuple[int, ...], kind: str, doc: str) -> torch.Tensor:
    """Check ``value`` is a tensor with one of ``dims`` dimensions and dtype kind ``int`` or ``float``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {doc}, got {type(value).__name__}")
    if value.dim() not in dims:
        raise ValueError(f"{name} must be {doc}, got shape {tuple(value.shape)}")
    if kind == "int" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name} must have an integer dtype, got {value.dtype}")
    if kind == "float" and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def check_same_device(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor, allow_cpu: bool = False):
    if value.device != other.device and not (allow_cpu and value.device.type == "cpu"):
        extra = " (or the CPU)" if allow_cpu else ""
        raise ValueError(f"{name} is on {value.device} but must be on {other.device}{extra}, like {other_name}")


def check_shape(name: str, value: torch.Tensor, expected: tuple, doc: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must be {doc} = {tuple(expected)}, got {tuple(value.shape)}")


def check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a real number, got {type(scale).__name__}")


def check_segments(starts, lengths, starts_name: str, lengths_name: str, device_name: str, device_of):
    check_tensor(starts_name, starts, (1,), "int", "(S,)")
    check_tensor(lengths_name, lengths, (1,), "int", "(S,)")
    check_shape(lengths_name, lengths, starts.shape, f"(S,) like {starts_name}")
    check_same_device(starts_name, starts, device_name, device_of, allow_cpu=True)
    check_same_device(lengths_name, lengths, starts_name, starts)


def check_compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill) -> None:
    if not isinstance(src, (list, tuple)) or len(src) == 0:
        raise ValueError(f"src must be a non-empty list of tensors (N_src, *feature), got {type(src).__name__}")
    for i, buf in enumerate(src):
        check_tensor(f"src[{i}]", buf, tuple(range(1, 9)), "any", "(N_src, *feature)")
        check_same_device(f"src[{i}]", buf, "src[0]", src[0])
    check_tensor("src_starts", src_starts, (1,), "int", "(S,)")
    num_segments = src_starts.shape[0]
    check_tensor("indices", indices, (2,), "int", "(S, K_max)")
    if indices.shape[0] != num_segments:
        raise ValueError(f"indices must be (S, K_max) with S = {num_segments}, got {tuple(indices.shape)}")
    check_tensor("counts", counts, (1,), "int", "(S,)")
    check_shape("counts", counts, (num_segments,), "(S,)")
    check_tensor("dst_starts", dst_starts, (1,), "int", "(S,)")
    check_shape("dst_starts", dst_starts, (num_segments,), "(S,)")
    check_same_device("src_starts", src_starts, "src[0]", src[0], allow_cpu=True)
    check_same_device("dst_starts", dst_starts, "src_starts", src_starts)
    check_same_device("indices", indices, "src[0]", src[0], allow_cpu=True)
    check_same_device("counts", counts, "src[0]", src[0], allow_cpu=True)
    try:
        rows = operator.index(dst_rows)
    except TypeError:
        raise ValueError(f"dst_rows must be an int, got {type(dst_rows).__name__}") from None
    if isinstance(dst_rows, bool) or rows < 0:
        raise ValueError(f"dst_rows must be an int >= 0, got {dst_rows!r}")
    if fill is not None and (not isinstance(fill, (list, tuple)) or len(fill) != len(src)):
        raise ValueError(f"fill must be None or a list with one value per src buffer ({len(src)}), got {fill!r}")


def check_evict_in_place(buffers, starts, lengths, indices, counts) -> None:
    if not isinstance(buffers, (list, tuple)) or len(buffers) == 0:
        raise ValueError(f"buffers must be a non-empty list of tensors (N_cap, *feature), got {type(buffers).__name__}")
    for i, buf in enumerate(buffers):
        check_tensor(f"buffers[{i}]", buf, tuple(range(1, 9)), "any", "(N_cap, *feature)")
        check_same_device(f"buffers[{i}]", buf, "buffers[0]", buffers[0])
    check_segments(starts, lengths, "starts", "lengths", "buffers[0]", buffers[0])
    check_tensor("indices", indices, (2,), "int", "(S, K_max)")
    if indices.shape[0] != starts.shape[0]:
        raise ValueError(f"indices must be (S, K_max) with S = {starts.shape[0]}, got {tuple(indices.shape)}")
    check_tensor("counts", counts, (1,), "int", "(S,)")
    check_shape("counts", counts, tuple(starts.shape), "(S,)")


def check_merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts) -> None:
    if not isinstance(dst, (list, tuple)) or not isinstance(src, (list, tuple)) or len(dst) != len(src) or not dst:
        raise ValueError("dst and src must be non-empty lists of tensors with one src buffer per dst buffer")
    for i, (out, buf) in enumerate(zip(dst, src)):
        check_tensor(f"dst[{i}]", out, tuple(range(1, 9)), "float", "(N_dst, *feature)")
        check_tensor(f"src[{i}]", buf, (out.dim(),), "float", "(N_src, *feature of dst)")
        if buf.shape[1:] != out.shape[1:]:
            raise ValueError(f"src[{i}] has features {tuple(buf.shape[1:])}, dst[{i}] {tuple(out.shape[1:])}")
    check_tensor("dst_starts", dst_starts, (1,), "int", "(S,)")
    check_tensor("src_starts", src_starts, (1,), "int", "(S,)")
    num_segments = dst_starts.shape[0]
    check_shape("src_starts", src_starts, (num_segments,), "(S,)")
    check_tensor("sources", sources, (2,), "int", "(S, E)")
    if sources.shape[0] != num_segments:
        raise ValueError(f"sources must be (S, E) with S = {num_segments}, got {tuple(sources.shape)}")
    check_tensor("targets", targets, (2,), "int", "(S, E)")
    check_shape("targets", targets, tuple(sources.shape), "(S, E) like sources")
    check_tensor("weights", weights, (2,), "float", "(S, E)")
    check_shape("weights", weights, tuple(sources.shape), "(S, E) like sources")
    check_tensor("source_counts", source_counts, (1,), "int", "(S,)")
    check_shape("source_counts", source_counts, (num_segments,), "(S,)")


def check_append(dst, starts, lengths, new) -> None:
    if not isinstance(dst, (list, tuple)) or len(dst) == 0:
        raise ValueError(f"dst must be a non-empty list of tensors (N_cap, *feature), got {type(dst).__name__}")
    if not isinstance(new, (list, tuple)) or len(new) != len(dst):
        raise ValueError(f"new must be a list of {len(dst)} tensors (S, q, *feature), one per dst buffer")
    for i, buf in enumerate(dst):
        check_tensor(f"dst[{i}]", buf, tuple(range(1, 9)), "any", "(N_cap, *feature)")
        check_same_device(f"dst[{i}]", buf, "dst[0]", dst[0])
    check_segments(starts, lengths, "starts", "lengths", "dst[0]", dst[0])
    num_segments = starts.shape[0]
    for i, (buf, tokens) in enumerate(zip(dst, new)):
        check_tensor(f"new[{i}]", tokens, (buf.dim() + 1,), "any", f"(S, q, *feature) with {buf.dim() - 1} feature dims")
        expected = (num_segments, new[0].shape[1], *buf.shape[1:])
        check_shape(f"new[{i}]", tokens, expected, "(S, q, *feature of dst)")
        check_same_device(f"new[{i}]", tokens, f"dst[{i}]", buf)
        if _kind(tokens.dtype) != _kind(buf.dtype):
            raise ValueError(f"new[{i}] has dtype {tokens.dtype}, which cannot be stored into dst[{i}] ({buf.dtype})")


def _kind(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point or dtype.is_complex else "int"


def check_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale,
                            sliding_window) -> None:
    check_tensor("query", query, (4,), "float", "(B, H_q, q, d)")
    batch, num_q_heads, q_len, head_dim = query.shape
    check_tensor("query_positions", query_positions, (2,), "int", "(B, q)")
    check_shape("query_positions", query_positions, (batch, q_len), "(B, q)")
    check_tensor("keys", keys, (2,), "float", "(N_cap, d)")
    if keys.shape[1] != head_dim:
        raise ValueError(f"keys must be (N_cap, d) with d = {head_dim} (query's), got {tuple(keys.shape)}")
    check_tensor("values", values, (2,), "float", "(N_cap, d_v)")
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"values must have N_cap = {keys.shape[0]} rows like keys, got {tuple(values.shape)}")
    check_tensor("positions", positions, (1,), "int", "(N_cap,)")
    check_shape("positions", positions, (keys.shape[0],), "(N_cap,)")
    for name, value in (("keys", keys), ("values", values), ("positions", positions),
                        ("query_positions", query_positions)):
        check_same_device(name, value, "query", query)
    check_segments(starts, lengths, "starts", "lengths", "query", query)
    num_segments = starts.shape[0]
    if batch > 0:
        if num_segments == 0 or num_segments % batch or num_q_heads % (num_segments // batch):
            raise ValueError(
                f"starts must have S = B * H_kv entries with H_q ({num_q_heads}) a multiple of H_kv; "
                f"got S = {num_segments} for B = {batch}"
            )
    elif num_segments:
        raise ValueError(f"starts must be empty when B = 0, got S = {num_segments}")
    check_scale(scale)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def check_host_layout(host_layout, starts) -> None:
    if host_layout is None:
        return
    if (
        not isinstance(host_layout, (list, tuple))
        or len(host_layout) != 2
        or any(len(part) != starts.shape[0] for part in host_layout)
    ):
        raise ValueError(f"host_layout must be (starts, lengths) as two lists of S = {starts.shape[0]} ints")


def _check_dense_keys(queries_name, queries, positions_name, query_positions, keys, key_positions,
                      key_position_dims: tuple[int, ...]) -> None:
    check_tensor(queries_name, queries, (4,), "float", "(B, H_q, n, d)")
    batch, num_q_heads, n, head_dim = queries.shape
    check_tensor(positions_name, query_positions, (2,), "int", "(B, n)")
    check_shape(positions_name, query_positions, (batch, n), "(B, n)")
    check_tensor("keys", keys, (4,), "float", "(B, H_kv, T, d)")
    if keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys must be (B, H_kv, T, d) with B = {batch}, d = {head_dim}, got {tuple(keys.shape)}")
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"keys must have H_kv >= 1 dividing H_q = {num_q_heads}, got H_kv = {num_kv_heads}")
    doc = "(B, H_kv, T) or (B, T)" if 2 in key_position_dims else "(B, H_kv, T)"
    check_tensor("key_positions", key_positions, key_position_dims, "int", doc)
    expected = (batch, num_keys) if key_positions.dim() == 2 else (batch, num_kv_heads, num_keys)
    check_shape("key_positions", key_positions, expected, doc)
    for name, value in ((positions_name, query_positions), ("keys", keys), ("key_positions", key_positions)):
        check_same_device(name, value, queries_name, queries)


def check_window_attention(window_queries, window_positions, keys, key_positions, scale) -> None:
    _check_dense_keys("window_queries", window_queries, "window_positions", window_positions, keys, key_positions,
                      (3,))
    check_scale(scale)


def check_column_max_logits(queries, query_positions, keys, key_positions, scale) -> None:
    _check_dense_keys("queries", queries, "query_positions", query_positions, keys, key_positions, (2, 3))
    check_scale(scale)
