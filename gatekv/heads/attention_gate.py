"""Attention gate (Attention-Gate): a small causal multi-head attention over the layer's hidden states, then a
linear map to one keep logit per KV head.

    a = CausalMHA(h)  (gate_heads heads of width gate_head_dim, no RoPE)      logit = W_o a + b      p = sigmoid(logit)

Flags for training: ``keep = 1[p > 0.5]`` with a straight-through estimator (:func:`ste_flags`). Inside
``gatekv.compress`` a token's logit is computed once when it enters, from the tokens of the same forward: with
one-shot prefill the gate sees the whole prompt (as in training); with chunked prefill only the current chunk and
at decode only the token itself (a train/inference mismatch for chunked prefill; documented, not hidden).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gatekv.heads.base import HeadsScorer

__all__ = ["AttentionGate", "AttentionGateLayer", "ste_flags"]


def ste_flags(logits: torch.Tensor) -> torch.Tensor:
    """Hard keep flags ``1[sigmoid(logit) > 0.5]`` in the forward, sigmoid's gradient in the backward."""
    p = torch.sigmoid(logits)
    hard = (p > 0.5).to(p.dtype)
    return hard + p - p.detach()


class AttentionGateLayer(nn.Module):
    """One layer's gate: ``hidden_states (B, q, D), valid (B, q) -> (B, H_kv, q)`` keep logits."""

    def __init__(self, hidden_size: int, num_kv_heads: int, gate_heads: int, gate_head_dim: int, init_keep_logit: float):
        super().__init__()
        self.gate_heads, self.gate_head_dim = gate_heads, gate_head_dim
        self.qkv = nn.Linear(hidden_size, 3 * gate_heads * gate_head_dim, bias=False)
        self.out = nn.Linear(gate_heads * gate_head_dim, num_kv_heads, bias=True)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, init_keep_logit)

    def forward(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        h = inputs["hidden_states"]
        batch, q, _ = h.shape
        qkv = self.qkv(h).reshape(batch, q, 3, self.gate_heads, self.gate_head_dim).permute(2, 0, 3, 1, 4)
        if bool((valid[:, 1:] <= valid[:, :-1]).all()):
            # no padding, or right padding only: a real query never reaches a padded key under the causal mask
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        else:  # left padding (inference batches): mask padded keys explicitly
            causal = torch.ones(q, q, dtype=torch.bool, device=h.device).tril()
            allowed = causal[None, None] & valid[:, None, None, :]
            allowed = allowed | torch.eye(q, dtype=torch.bool, device=h.device)  # padding rows see themselves: no NaN
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed)  # (B, gh, q, gd)
        return self.out(attended.transpose(1, 2).flatten(2)).transpose(1, 2)  # (B, H_kv, q)


class AttentionGate(HeadsScorer):
    """Per layer a reduced causal attention (``gate_heads`` x ``gate_head_dim``) on hidden states -> H_kv logits."""

    head_type = "attention_gate"
    needs = frozenset({"hidden_states"})

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        return AttentionGateLayer(
            c.fingerprint.hidden_size, c.fingerprint.num_kv_heads, c.gate_heads, c.gate_head_dim, c.init_keep_logit
        )
