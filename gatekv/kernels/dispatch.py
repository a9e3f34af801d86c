"""Backend selection for the ragged KV-cache kernels (signatures: see ``reference.py``)."""

from __future__ import annotations

import torch

from gatekv.kernels import reference

_BACKENDS = ("auto", "reference")
_backend = "auto"


def set_backend(name: str) -> None:
    """Force a kernel backend for every call: one of ``auto`` (default) or ``reference``."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {list(_BACKENDS)}")
    _backend = name


def get_backend() -> str:
    """The backend requested with ``set_backend`` (``auto`` picks per call)."""
    return _backend


def compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill=None):
    """Gather kept slots of every segment into a new flat buffer (see ``reference.compact_reference``)."""
    return reference.compact_reference(src, src_starts, indices, counts, dst_starts, dst_rows, fill)


def append(dst, starts, lengths, new):
    """Write new tokens after each segment's filled slots, in place (see ``reference.append_reference``)."""
    reference.append_reference(dst, starts, lengths, new)


def ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window=None):
    """Causal GQA attention over the ragged cache (see ``reference.ragged_attention_reference``)."""
    return reference.ragged_attention_reference(
        query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window
    )


def window_attention(window_queries, window_positions, keys, key_positions, scale) -> torch.Tensor:
    """Observation-window attention ``(B, H_q, w, T)`` (see ``reference.window_attention_reference``)."""
    return reference.window_attention_reference(window_queries, window_positions, keys, key_positions, scale)


def column_max_logits(queries, query_positions, keys, key_positions, scale) -> torch.Tensor:
    """Column max of logits over queries and GQA group ``(B, H_kv, T)`` (see ``reference``)."""
    return reference.column_max_logits_reference(queries, query_positions, keys, key_positions, scale)
