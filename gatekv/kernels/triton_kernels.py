"""Triton kernels for the ragged KV cache: compaction, append, ragged GQA attention, window reductions, merge.

One file per op (kernel ``_name_kernel``, launch wrapper ``_launch_name``, public function): ``triton_compact``,
``triton_append``, ``triton_attention``, ``triton_window``, ``triton_column_max``, ``triton_merge``; shared pieces
in ``triton_common``. This module imports them all at once (``dispatch`` loads it on first use) and names their
public functions. Each public function validates its arguments (``checks.py``) unless called with
``validate=False``, as ``dispatch`` does after its own check: one validation per call.

Every public function has the signature of its PyTorch reference in ``reference.py`` (plus keyword-only tuning
knobs) and returns the same data (data movement: bit for bit) or the same values within the tolerances stated in
``tests/kernels`` (arithmetic). Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run
on CPU tensors through Triton's interpreter; without it every tensor must be on a CUDA device.
"""

from gatekv.kernels.triton_append import append
from gatekv.kernels.triton_attention import ragged_attention
from gatekv.kernels.triton_column_max import column_max_logits
from gatekv.kernels.triton_common import INTERPRETED as _INTERPRETED
from gatekv.kernels.triton_compact import compact
from gatekv.kernels.triton_merge import merge
from gatekv.kernels.triton_window import window_attention

__all__ = ["append", "column_max_logits", "compact", "merge", "ragged_attention", "window_attention"]
