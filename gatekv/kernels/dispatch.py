"""Backend selection for the ragged KV-cache kernels (signatures: see ``reference.py``).

Backends:

- ``auto`` (default): Triton when the inputs are on CUDA, or when ``TRITON_INTERPRET=1`` and the kernels were
  imported under Triton's CPU interpreter; the PyTorch reference otherwise (and for dtypes Triton does not take).
- ``reference``: always the PyTorch reference.
- ``triton``: always Triton (CPU tensors then need ``TRITON_INTERPRET=1``).
- ``flash``: ``ragged_attention`` through flash-attn's ``flash_attn_with_kvcache`` when it applies (decode, one
  query per row, fp16/bf16, no sliding window, every stored slot a past token), ``auto`` otherwise. Not the
  default: deciding that it applies costs one host synchronisation per call, the Triton path needs none.

Every call validates its arguments first (shapes, dtypes, devices) and raises ``ValueError`` naming the bad
argument, whichever backend runs. Triton and flash-attn are imported lazily: ``import gatekv.kernels`` needs
only torch.
"""

from __future__ import annotations

import importlib.util
import numbers
import operator
import os

import torch

from gatekv.kernels import reference

_BACKENDS = ("auto", "flash", "reference", "triton")
_backend = "auto"
# Float dtypes the Triton attention kernels load (compact/append move any dtype bit for bit).
_TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_triton_kernels = None
_triton_import_error: Exception | None = None


def set_backend(name: str) -> None:
    """Force a kernel backend for every call: one of ``auto`` (default), ``flash``, ``reference``, ``triton``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {list(_BACKENDS)}")
    if name == "triton" and _load_triton() is None:
        raise ValueError(f"kernel backend 'triton' needs the triton package: {_triton_import_error}")
    if name == "flash":
        from gatekv.kernels import flash

        if not flash.is_available():
            raise ValueError("kernel backend 'flash' needs flash-attn (>= 2.6, with cache_leftpad) importable")
    _backend = name


def get_backend() -> str:
    """The backend requested with ``set_backend`` (``auto`` picks per call)."""
    return _backend


def compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill=None):
    """Gather kept slots of every segment into a new flat buffer (see ``reference.compact_reference``)."""
    _check_compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill)
    if _use_triton(src):
        return _triton_kernels.compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill)
    return reference.compact_reference(src, src_starts, indices, counts, dst_starts, dst_rows, fill)


def evict_in_place(buffers, starts, lengths, indices, counts):
    """Evict inside each segment's slots, moving only the kept tail slots into the holes (see
    ``reference.evict_in_place_reference``); vectorised PyTorch on every device."""
    if not isinstance(buffers, (list, tuple)) or len(buffers) == 0:
        raise ValueError(f"buffers must be a non-empty list of tensors (N_cap, *feature), got {type(buffers).__name__}")
    for i, buf in enumerate(buffers):
        _tensor(f"buffers[{i}]", buf, tuple(range(1, 9)), "any", "(N_cap, *feature)")
        _same_device(f"buffers[{i}]", buf, "buffers[0]", buffers[0])
    _check_segments(starts, lengths, "starts", "lengths", "buffers[0]", buffers[0])
    _tensor("indices", indices, (2,), "int", "(S, K_max)")
    if indices.shape[0] != starts.shape[0]:
        raise ValueError(f"indices must be (S, K_max) with S = {starts.shape[0]}, got {tuple(indices.shape)}")
    _tensor("counts", counts, (1,), "int", "(S,)")
    _shape("counts", counts, tuple(starts.shape), "(S,)")
    reference.evict_in_place_reference(buffers, starts, lengths, indices, counts)


def merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts):
    """Merge dropped tokens into the kept ones of the compacted storage, in place (``reference.merge_reference``)."""
    _check_merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)
    if _use_triton(dst, floats=True) and hasattr(_triton_kernels, "merge"):
        _triton_kernels.merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)
    else:
        reference.merge_reference(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)


def append(dst, starts, lengths, new):
    """Write new tokens after each segment's filled slots, in place (see ``reference.append_reference``)."""
    _check_append(dst, starts, lengths, new)
    if _use_triton(dst):
        _triton_kernels.append(dst, starts, lengths, new)
    else:
        reference.append_reference(dst, starts, lengths, new)


def ragged_attention(
    query,
    query_positions,
    keys,
    values,
    positions,
    starts,
    lengths,
    scale,
    sliding_window=None,
    *,
    unmasked: bool = False,
    host_layout: tuple[list[int], list[int]] | None = None,
):
    """Causal GQA attention over the ragged cache (see ``reference.ragged_attention_reference``).

    unmasked:    the caller guarantees that no slot needs masking: one query per row, every filled slot holds a
                 token at or before the query's position and inside the sliding window. The PyTorch path then
                 runs one SDPA per segment (``torch_ragged``) and flash-attn skips its own check (no host sync);
                 Triton masks for free and ignores it.
    host_layout: ``(starts, lengths)`` as Python lists, when the caller has them: saves the PyTorch paths a
                 device-to-host copy.
    """
    _check_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window)
    _check_host_layout(host_layout, starts)
    unmasked = bool(unmasked) and query.shape[2] == 1
    if _backend == "flash":
        from gatekv.kernels import flash

        if flash.supports(query, keys, values, sliding_window):
            out = flash.ragged_attention(
                query, query_positions, keys, values, positions, starts, lengths, scale, check=not unmasked
            )
            if out is not None:
                return out
    if _use_triton([query, keys, values], floats=True):
        return _triton_kernels.ragged_attention(
            query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window
        )
    if _backend == "reference":
        return reference.ragged_attention_reference(
            query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window
        )
    from gatekv.kernels import torch_ragged

    starts_list, lengths_list = host_layout if host_layout is not None else (starts.tolist(), lengths.tolist())
    if unmasked:
        return torch_ragged.ragged_decode_unmasked(query, keys, values, starts_list, lengths_list, scale)
    return torch_ragged.ragged_attention_sdpa(
        query, query_positions, keys, values, positions, starts_list, lengths_list, scale, sliding_window
    )


def window_attention(window_queries, window_positions, keys, key_positions, scale) -> torch.Tensor:
    """Observation-window attention ``(B, H_q, w, T)`` (see ``reference.window_attention_reference``)."""
    _check_window_attention(window_queries, window_positions, keys, key_positions, scale)
    if _use_triton([window_queries, keys], floats=True):
        return _triton_kernels.window_attention(window_queries, window_positions, keys, key_positions, scale)
    return reference.window_attention_reference(window_queries, window_positions, keys, key_positions, scale)


def column_max_logits(queries, query_positions, keys, key_positions, scale) -> torch.Tensor:
    """Column max of logits over queries and GQA group ``(B, H_kv, T)`` (see ``reference``)."""
    _check_column_max_logits(queries, query_positions, keys, key_positions, scale)
    if _use_triton([queries, keys], floats=True):
        return _triton_kernels.column_max_logits(queries, query_positions, keys, key_positions, scale)
    return reference.column_max_logits_reference(queries, query_positions, keys, key_positions, scale)


# --------------------------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------------------------


def _load_triton():
    """The Triton kernel module, imported on first use; None when triton is not importable."""
    global _triton_kernels, _triton_import_error
    if _triton_kernels is None and _triton_import_error is None:
        if importlib.util.find_spec("triton") is None:
            _triton_import_error = ImportError("No module named 'triton'")
            return None
        try:
            from gatekv.kernels import triton_kernels
        except ImportError as error:
            _triton_import_error = error
            return None
        _triton_kernels = triton_kernels
    return _triton_kernels


def _use_triton(tensors, floats: bool = False) -> bool:
    """Whether this call goes to Triton (see the module docstring)."""
    if _backend == "reference":
        return False
    if _backend == "triton":
        return _load_triton() is not None
    if floats and any(t.dtype not in _TRITON_FLOATS for t in tensors):
        return False
    on_cuda = any(t.is_cuda for t in tensors)
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # the common CPU case: decided without importing triton
    module = _load_triton()
    return module is not None and (on_cuda or module._INTERPRETED)


# --------------------------------------------------------------------------------------------------------------
# argument checks (shared by every backend; no host synchronisation)
# --------------------------------------------------------------------------------------------------------------


def _tensor(name: str, value, dims: tuple[int, ...], kind: str, doc: str) -> torch.Tensor:
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


def _same_device(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor, allow_cpu: bool = False):
    if value.device != other.device and not (allow_cpu and value.device.type == "cpu"):
        extra = " (or the CPU)" if allow_cpu else ""
        raise ValueError(f"{name} is on {value.device} but must be on {other.device}{extra}, like {other_name}")


def _shape(name: str, value: torch.Tensor, expected: tuple, doc: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must be {doc} = {tuple(expected)}, got {tuple(value.shape)}")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a real number, got {type(scale).__name__}")


def _check_segments(starts, lengths, starts_name: str, lengths_name: str, device_name: str, device_of):
    _tensor(starts_name, starts, (1,), "int", "(S,)")
    _tensor(lengths_name, lengths, (1,), "int", "(S,)")
    _shape(lengths_name, lengths, starts.shape, f"(S,) like {starts_name}")
    _same_device(starts_name, starts, device_name, device_of, allow_cpu=True)
    _same_device(lengths_name, lengths, starts_name, starts)


def _check_compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill) -> None:
    if not isinstance(src, (list, tuple)) or len(src) == 0:
        raise ValueError(f"src must be a non-empty list of tensors (N_src, *feature), got {type(src).__name__}")
    for i, buf in enumerate(src):
        _tensor(f"src[{i}]", buf, tuple(range(1, 9)), "any", "(N_src, *feature)")
        _same_device(f"src[{i}]", buf, "src[0]", src[0])
    _tensor("src_starts", src_starts, (1,), "int", "(S,)")
    num_segments = src_starts.shape[0]
    _tensor("indices", indices, (2,), "int", "(S, K_max)")
    if indices.shape[0] != num_segments:
        raise ValueError(f"indices must be (S, K_max) with S = {num_segments}, got {tuple(indices.shape)}")
    _tensor("counts", counts, (1,), "int", "(S,)")
    _shape("counts", counts, (num_segments,), "(S,)")
    _tensor("dst_starts", dst_starts, (1,), "int", "(S,)")
    _shape("dst_starts", dst_starts, (num_segments,), "(S,)")
    _same_device("src_starts", src_starts, "src[0]", src[0], allow_cpu=True)
    _same_device("dst_starts", dst_starts, "src_starts", src_starts)
    _same_device("indices", indices, "src[0]", src[0], allow_cpu=True)
    _same_device("counts", counts, "src[0]", src[0], allow_cpu=True)
    try:
        rows = operator.index(dst_rows)
    except TypeError:
        raise ValueError(f"dst_rows must be an int, got {type(dst_rows).__name__}") from None
    if isinstance(dst_rows, bool) or rows < 0:
        raise ValueError(f"dst_rows must be an int >= 0, got {dst_rows!r}")
    if fill is not None and (not isinstance(fill, (list, tuple)) or len(fill) != len(src)):
        raise ValueError(f"fill must be None or a list with one value per src buffer ({len(src)}), got {fill!r}")


def _check_merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts) -> None:
    if not isinstance(dst, (list, tuple)) or not isinstance(src, (list, tuple)) or len(dst) != len(src) or not dst:
        raise ValueError("dst and src must be non-empty lists of tensors with one src buffer per dst buffer")
    for i, (out, buf) in enumerate(zip(dst, src)):
        _tensor(f"dst[{i}]", out, tuple(range(1, 9)), "float", "(N_dst, *feature)")
        _tensor(f"src[{i}]", buf, (out.dim(),), "float", "(N_src, *feature of dst)")
        if buf.shape[1:] != out.shape[1:]:
            raise ValueError(f"src[{i}] has features {tuple(buf.shape[1:])}, dst[{i}] {tuple(out.shape[1:])}")
    _tensor("dst_starts", dst_starts, (1,), "int", "(S,)")
    _tensor("src_starts", src_starts, (1,), "int", "(S,)")
    num_segments = dst_starts.shape[0]
    _shape("src_starts", src_starts, (num_segments,), "(S,)")
    _tensor("sources", sources, (2,), "int", "(S, E)")
    if sources.shape[0] != num_segments:
        raise ValueError(f"sources must be (S, E) with S = {num_segments}, got {tuple(sources.shape)}")
    _tensor("targets", targets, (2,), "int", "(S, E)")
    _shape("targets", targets, tuple(sources.shape), "(S, E) like sources")
    _tensor("weights", weights, (2,), "float", "(S, E)")
    _shape("weights", weights, tuple(sources.shape), "(S, E) like sources")
    _tensor("source_counts", source_counts, (1,), "int", "(S,)")
    _shape("source_counts", source_counts, (num_segments,), "(S,)")


def _check_append(dst, starts, lengths, new) -> None:
    if not isinstance(dst, (list, tuple)) or len(dst) == 0:
        raise ValueError(f"dst must be a non-empty list of tensors (N_cap, *feature), got {type(dst).__name__}")
    if not isinstance(new, (list, tuple)) or len(new) != len(dst):
        raise ValueError(f"new must be a list of {len(dst)} tensors (S, q, *feature), one per dst buffer")
    for i, buf in enumerate(dst):
        _tensor(f"dst[{i}]", buf, tuple(range(1, 9)), "any", "(N_cap, *feature)")
        _same_device(f"dst[{i}]", buf, "dst[0]", dst[0])
    _check_segments(starts, lengths, "starts", "lengths", "dst[0]", dst[0])
    num_segments = starts.shape[0]
    for i, (buf, tokens) in enumerate(zip(dst, new)):
        _tensor(f"new[{i}]", tokens, (buf.dim() + 1,), "any", f"(S, q, *feature) with {buf.dim() - 1} feature dims")
        expected = (num_segments, new[0].shape[1], *buf.shape[1:])
        _shape(f"new[{i}]", tokens, expected, "(S, q, *feature of dst)")
        _same_device(f"new[{i}]", tokens, f"dst[{i}]", buf)
        if _kind(tokens.dtype) != _kind(buf.dtype):
            raise ValueError(f"new[{i}] has dtype {tokens.dtype}, which cannot be stored into dst[{i}] ({buf.dtype})")


def _kind(dtype: torch.dtype) -> str:
    return "float" if dtype.is_floating_point or dtype.is_complex else "int"


def _check_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale,
                            sliding_window) -> None:
    _tensor("query", query, (4,), "float", "(B, H_q, q, d)")
    batch, num_q_heads, q_len, head_dim = query.shape
    _tensor("query_positions", query_positions, (2,), "int", "(B, q)")
    _shape("query_positions", query_positions, (batch, q_len), "(B, q)")
    _tensor("keys", keys, (2,), "float", "(N_cap, d)")
    if keys.shape[1] != head_dim:
        raise ValueError(f"keys must be (N_cap, d) with d = {head_dim} (query's), got {tuple(keys.shape)}")
    _tensor("values", values, (2,), "float", "(N_cap, d_v)")
    if values.shape[0] != keys.shape[0]:
        raise ValueError(f"values must have N_cap = {keys.shape[0]} rows like keys, got {tuple(values.shape)}")
    _tensor("positions", positions, (1,), "int", "(N_cap,)")
    _shape("positions", positions, (keys.shape[0],), "(N_cap,)")
    for name, value in (("keys", keys), ("values", values), ("positions", positions),
                        ("query_positions", query_positions)):
        _same_device(name, value, "query", query)
    _check_segments(starts, lengths, "starts", "lengths", "query", query)
    num_segments = starts.shape[0]
    if batch > 0:
        if num_segments == 0 or num_segments % batch or num_q_heads % (num_segments // batch):
            raise ValueError(
                f"starts must have S = B * H_kv entries with H_q ({num_q_heads}) a multiple of H_kv; "
                f"got S = {num_segments} for B = {batch}"
            )
    elif num_segments:
        raise ValueError(f"starts must be empty when B = 0, got S = {num_segments}")
    _check_scale(scale)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def _check_host_layout(host_layout, starts) -> None:
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
    _tensor(queries_name, queries, (4,), "float", "(B, H_q, n, d)")
    batch, num_q_heads, n, head_dim = queries.shape
    _tensor(positions_name, query_positions, (2,), "int", "(B, n)")
    _shape(positions_name, query_positions, (batch, n), "(B, n)")
    _tensor("keys", keys, (4,), "float", "(B, H_kv, T, d)")
    if keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys must be (B, H_kv, T, d) with B = {batch}, d = {head_dim}, got {tuple(keys.shape)}")
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"keys must have H_kv >= 1 dividing H_q = {num_q_heads}, got H_kv = {num_kv_heads}")
    doc = "(B, H_kv, T) or (B, T)" if 2 in key_position_dims else "(B, H_kv, T)"
    _tensor("key_positions", key_positions, key_position_dims, "int", doc)
    expected = (batch, num_keys) if key_positions.dim() == 2 else (batch, num_kv_heads, num_keys)
    _shape("key_positions", key_positions, expected, doc)
    for name, value in ((positions_name, query_positions), ("keys", keys), ("key_positions", key_positions)):
        _same_device(name, value, queries_name, queries)


def _check_window_attention(window_queries, window_positions, keys, key_positions, scale) -> None:
    _check_dense_keys("window_queries", window_queries, "window_positions", window_positions, keys, key_positions,
                      (3,))
    _check_scale(scale)


def _check_column_max_logits(queries, query_positions, keys, key_positions, scale) -> None:
    _check_dense_keys("queries", queries, "query_positions", query_positions, keys, key_positions, (2, 3))
    _check_scale(scale)
