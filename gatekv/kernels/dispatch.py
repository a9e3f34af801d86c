"""Backend selection for the ragged KV-cache kernels (signatures: see ``reference.py``).

Backends:

- ``auto`` (default): Triton when the inputs are on CUDA, or when ``TRITON_INTERPRET=1`` and the kernels were
  imported under Triton's CPU interpreter; the PyTorch reference otherwise (and for dtypes Triton does not take).
- ``reference``: always the PyTorch reference.
- ``triton``: always Triton (CPU tensors then need ``TRITON_INTERPRET=1``).
- ``flash``: ``ragged_attention`` through flash-attn's ``flash_attn_with_kvcache`` when it applies (decode, one
  query per row, fp16/bf16, no sliding window, every stored slot a past token), ``auto`` otherwise. Not the
  default: deciding that it applies costs one host synchronisation per call, the Triton path needs none.

Every call validates its arguments once (``checks.py``: shapes, dtypes, devices) and raises ``ValueError``
naming the bad argument, whichever backend runs (the Triton functions are then called with ``validate=False``). Triton and flash-attn are imported lazily: ``import gatekv.kernels`` needs
only torch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from gatekv.kernels import checks, reference

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
    checks.check_compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill)
    if _use_triton(src):
        return _triton_kernels.compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill, validate=False)
    return reference.compact_reference(src, src_starts, indices, counts, dst_starts, dst_rows, fill)


def evict_in_place(buffers, starts, lengths, indices, counts):
    """Evict inside each segment's slots, moving only the kept tail slots into the holes (see
    ``reference.evict_in_place_reference``); vectorised PyTorch on every device."""
    checks.check_evict_in_place(buffers, starts, lengths, indices, counts)
    reference.evict_in_place_reference(buffers, starts, lengths, indices, counts)


def merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts):
    """Merge dropped tokens into the kept ones of the compacted storage, in place (``reference.merge_reference``)."""
    checks.check_merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)
    if _use_triton(dst, floats=True) and hasattr(_triton_kernels, "merge"):
        _triton_kernels.merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts,
                              validate=False)
    else:
        reference.merge_reference(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)


def append(dst, starts, lengths, new):
    """Write new tokens after each segment's filled slots, in place (see ``reference.append_reference``)."""
    checks.check_append(dst, starts, lengths, new)
    if _use_triton(dst):
        _triton_kernels.append(dst, starts, lengths, new, validate=False)
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
    validate: bool = True,
    flat_mask=None,
):
    """Causal GQA attention over the ragged cache (see ``reference.ragged_attention_reference``).

    unmasked:    the caller guarantees that no slot needs masking: one query per row, every filled slot holds a
                 token at or before the query's position and inside the sliding window. The PyTorch path then
                 runs one SDPA per segment (``torch_ragged``) and flash-attn skips its own check (no host sync);
                 Triton masks for free and ignores it.
    host_layout: ``(starts, lengths)`` as Python lists, when the caller has them: saves the PyTorch paths a
                 device-to-host copy.
    validate:    False skips the argument checks: for the cache's own decode step, whose buffers and layout the
                 cache built (the checks cost about as much as the attention of a short segment on CPU).
    flat_mask:   the layout's ``torch_ragged.FlatDecodeMask`` (kept by the cache): an unmasked decode over uneven
                 segments then takes the PyTorch flat path instead of one SDPA call per segment.
    """
    if validate:
        checks.check_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale,
                                      sliding_window)
        checks.check_host_layout(host_layout, starts)
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
            query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window, validate=False
        )
    if _backend == "reference":
        return reference.ragged_attention_reference(
            query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window
        )
    from gatekv.kernels import torch_ragged

    starts_list, lengths_list = host_layout if host_layout is not None else (starts.tolist(), lengths.tolist())
    if unmasked:
        return torch_ragged.ragged_decode_unmasked(query, keys, values, starts_list, lengths_list, scale, flat_mask)
    return torch_ragged.ragged_attention_sdpa(
        query, query_positions, keys, values, positions, starts_list, lengths_list, scale, sliding_window
    )


def window_attention(window_queries, window_positions, keys, key_positions, scale) -> torch.Tensor:
    """Observation-window attention ``(B, H_q, w, T)`` (see ``reference.window_attention_reference``)."""
    checks.check_window_attention(window_queries, window_positions, keys, key_positions, scale)
    if _use_triton([window_queries, keys], floats=True):
        return _triton_kernels.window_attention(window_queries, window_positions, keys, key_positions, scale,
                                                validate=False)
    if _backend == "reference":
        return reference.window_attention_reference(window_queries, window_positions, keys, key_positions, scale)
    from gatekv.kernels import torch_ragged

    return torch_ragged.window_attention_torch(window_queries, window_positions, keys, key_positions, scale)


def column_max_logits(queries, query_positions, keys, key_positions, scale) -> torch.Tensor:
    """Column max of logits over queries and GQA group ``(B, H_kv, T)`` (see ``reference``)."""
    checks.check_column_max_logits(queries, query_positions, keys, key_positions, scale)
    if _use_triton([queries, keys], floats=True):
        return _triton_kernels.column_max_logits(queries, query_positions, keys, key_positions, scale,
                                                 validate=False)
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
    on_cuda = any(t.is_cuda for t in tensors)
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # the common CPU case: decided without importing triton
    if floats and any(t.dtype not in _TRITON_FLOATS for t in tensors):
        return False
    module = _load_triton()
    return module is not None and (on_cuda or module._INTERPRETED)
