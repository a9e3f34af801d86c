"""Attention gate (Attention-Gate): a small causal multi-head attention over the layer's hidden states, then a
linear map to one keep logit per KV head.

    a = CausalMHA(h)  (gate_heads heads of width gate_head_dim, no RoPE)      logit = W_o a + b      p = sigmoid(logit)

Flags for training: ``keep = 1[p > 0.5]`` with a straight-through estimator (:func:`ste_flags`). Inside
``gatekv.compress`` a token's logit is computed once when it enters, from the tokens of the same forward: with
one-shot prefill the gate sees the whole prompt (as in training); with chunked prefill only the current chunk and
at decode only the token itself (a train/inference mismatch for chunked prefill; documented, not hidden).

With ``gate_window = W > 0`` each token attends only to itself and the ``W - 1`` tokens before it (a sliding
window, computed block by block: O(T W) instead of the full causal attention's O(T^2)). The full gate attention
costs ~2.4% of SmolLM2-135M's 2K prefill on 2 CPU cores and ~6% at 8K (its share grows with T); the windowed gate
stays a fixed small share. Chunked prefill then differs from one-shot only in the first ``W - 1`` tokens of a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gatekv.heads.base import HeadsScorer

__all__ = ["AttentionGate", "AttentionGateLayer", "ste_flags", "windowed_causal_attention"]


def ste_flags(logits: torch.Tensor) -> torch.Tensor:
    """Hard keep flags ``1[sigmoid(logit) > 0.5]`` in the forward, sigmoid's gradient in the backward."""
    p = torch.sigmoid(logits)
    hard = (p > 0.5).to(p.dtype)
    return hard + p - p.detach()


def windowed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention where query ``i`` sees keys ``i - window < j <= i`` (and only valid ones).

    ``q, k, v``: ``(B, h, T, d)``; ``key_valid``: ``(B, T)`` bool or None (all valid). A query whose window holds no
    valid key (a padding row) sees itself, so no row is NaN. Computed in blocks of ``window`` queries against their
    block and the previous one: ``(B, h, T/W, W, 2W)`` scores, never ``T x T``.
    """
    batch, heads, length, dim = q.shape
    blocks = -(-length // window)
    pad = blocks * window - length
    if pad:  # padded positions come after every real query: the causal band never reaches them
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb, kb, vb = (x.reshape(batch, heads, blocks, window, dim) for x in (q, k, v))

    def with_previous(x: torch.Tensor) -> torch.Tensor:  # (B, h, n, W, d) -> (B, h, n, 2W, d): previous block, own
        return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1], x], dim=3)

    i = torch.arange(window, device=q.device)[:, None] + window  # query positions in the 2W frame
    j = torch.arange(2 * window, device=q.device)[None]
    allowed = ((j <= i) & (j > i - window)).expand(blocks, window, 2 * window).clone()  # (n, W, 2W)
    allowed[0, :, :window] = False  # block 0 has no previous block
    if key_valid is not None:
        kv = F.pad(key_valid, (0, pad), value=False).reshape(batch, blocks, window)
        kv = torch.cat([F.pad(kv, (0, 0, 1, 0), value=False)[:, :-1], kv], dim=2)  # (B, n, 2W)
        allowed = allowed[None] & kv[:, :, None, :]  # (B, n, W, 2W)
        allowed = allowed | (j == i)  # a row with no valid key sees itself
        allowed = allowed[:, None]  # broadcast over heads
    scores = (qb * dim**-0.5) @ with_previous(kb).transpose(-1, -2)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = weights @ with_previous(vb)  # (B, h, n, W, d)
    return out.reshape(batch, heads, blocks * window, dim)[:, :, :length]


class AttentionGateLayer(nn.Module):
    """One layer's gate: ``hidden_states (B, q, D), valid (B, q) -> (B, H_kv, q)`` keep logits."""

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        gate_heads: int,
        gate_head_dim: int,
        init_keep_logit: float,
        window: int = 0,
    ):
        super().__init__()
        self.gate_heads, self.gate_head_dim, self.window = gate_heads, gate_head_dim, window
        self.qkv = nn.Linear(hidden_size, 3 * gate_heads * gate_head_dim, bias=False)
        self.out = nn.Linear(gate_heads * gate_head_dim, num_kv_heads, bias=True)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, init_keep_logit)

    def forward(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        h = inputs["hidden_states"]
        batch, q, _ = h.shape
        qkv = self.qkv(h).reshape(batch, q, 3, self.gate_heads, self.gate_head_dim).permute(2, 0, 3, 1, 4)
        if self.window:
            key_valid = None if bool(valid.all()) else valid
            attended = windowed_causal_attention(qkv[0], qkv[1], qkv[2], self.window, key_valid)
        elif bool((valid[:, 1:] <= valid[:, :-1]).all()):
            # no padding, or right padding only: a real query never reaches a padded key under the causal mask
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        else:  # left padding (inference batches): mask padded keys explicitly
            causal = torch.ones(q, q, dtype=torch.bool, device=h.device).tril()
            allowed = causal[None, None] & valid[:, None, None, :]
            allowed = allowed | torch.eye(q, dtype=torch.bool, device=h.device)  # padding rows see themselves: no NaN
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed)  # (B, gh, q, gd)
        return self.out(attended.transpose(1, 2).flatten(2)).transpose(1, 2)  # (B, H_kv, q)


class AttentionGate(HeadsScorer):
    """Per layer a reduced causal attention (``gate_heads`` x ``gate_head_dim``, over the whole forward or a sliding
    ``gate_window``) on hidden states -> H_kv logits."""

    head_type = "attention_gate"
    needs = frozenset({"hidden_states"})

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        return AttentionGateLayer(
            c.fingerprint.hidden_size, c.fingerprint.num_kv_heads, c.gate_heads, c.gate_head_dim, c.init_keep_logit,
            window=c.gate_window,
        )
