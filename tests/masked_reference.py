"""An independent masked reference: the full (uncompressed) model where evicted keys are masked out.

Given the evictions a compression session recorded (``record=True``), a query at position ``p`` of row ``b`` may
attend key position ``j`` of layer ``l``, KV head ``h`` iff ``j <= p`` (causal), ``j`` is a real token, and for
every eviction that happened before ``p`` was processed (its ``last_position < p``) either ``j`` was kept by it or
``j`` came after it. Attention itself is plain eager PyTorch with ``repeat_kv``: nothing from gatekv's kernels.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

NAME = "gatekv_test_masked_reference"


class _State:
    events = None
    token_positions = None  # (B, T) positions, -1 for padding
    sliding = None


def _allowed(layer_idx: int, query_positions, key_positions, num_kv_heads: int) -> torch.Tensor:
    """(B, H_kv, q, k) bool."""
    qpos = query_positions[:, None, :, None]
    kpos = key_positions[:, None, None, :]
    allowed = (kpos >= 0) & (qpos >= 0) & (kpos <= qpos)
    allowed = allowed.expand(-1, num_kv_heads, -1, -1).clone()
    for event in _State.events:
        kept = event.kept_positions[layer_idx]  # (B, H, K)
        last = event.last_position[:, None, None, None]  # (B,1,1,1)
        in_kept = (key_positions[:, None, :, None] == kept[:, :, None, :]).any(-1)  # (B, H, k)
        survives = in_kept[:, :, None, :] | (kpos > last)
        applies = qpos > last
        allowed &= survives | ~applies
    if _State.sliding is not None:
        allowed &= (qpos - kpos) < _State.sliding
    return allowed


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    batch, num_q_heads, q_len, _ = query.shape
    num_kv_heads = key.shape[1]
    group = num_q_heads // num_kv_heads
    positions = _State.token_positions
    key_positions = positions[:, : key.shape[2]]
    query_positions = positions[:, key.shape[2] - q_len : key.shape[2]]
    allowed = _allowed(module.layer_idx, query_positions, key_positions, num_kv_heads)
    allowed = allowed.repeat_interleave(group, dim=1)
    k = key.repeat_interleave(group, dim=1).double()
    v = value.repeat_interleave(group, dim=1).double()
    logits = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    out = torch.matmul(weights, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def masked_reference(model, events, token_positions, sliding_window=None):
    """Inside the block, ``model``'s attention masks what ``events`` evicted (see module docstring)."""
    AttentionInterface.register(NAME, _masked_attention)
    previous = model.config._attn_implementation
    _State.events, _State.token_positions, _State.sliding = events, token_positions, sliding_window
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _State.events = _State.token_positions = None


def reference_logits(model, ids, mask, events, sliding_window=None):
    """Logits (B, T, V) of one teacher-forced forward over ``ids`` (B, T) with the masked reference."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    token_positions = torch.where(mask.bool(), positions, torch.full_like(positions, -1))
    with masked_reference(model, events, token_positions, sliding_window), torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
