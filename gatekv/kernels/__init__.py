"""Ragged KV-cache kernels behind one dispatch.

``reference.py`` is the executable specification (plain PyTorch). Each public function here picks an
implementation for its inputs: Triton on CUDA (or under ``TRITON_INTERPRET=1``), flash-attn where it applies,
the reference otherwise. ``set_backend("reference")`` forces one backend (tests, debugging).
"""

from gatekv.kernels.dispatch import (
    append,
    column_max_logits,
    compact,
    evict_in_place,
    get_backend,
    merge,
    ragged_attention,
    set_backend,
    window_attention,
)
from gatekv.kernels.reference import layout_from_caps

__all__ = [
    "append",
    "column_max_logits",
    "compact",
    "evict_in_place",
    "get_backend",
    "layout_from_caps",
    "merge",
    "ragged_attention",
    "set_backend",
    "window_attention",
]
