"""Linear / MLP hidden-state gate (DMS, KVzap, TRIM-KV style): per token, keep logits from the layer's input.

    logit_t = W RMSNorm(h_t)                       (hidden = 0)
    logit_t = W2 act(W1 RMSNorm(h_t))              (hidden > 0, e.g. 512)

``h_t`` is the attention block's input (after the layer's input norm) of token t; one logit per KV head,
higher = keep. Trained with the ``distill`` target (keep probability = sigmoid(logit)) or regressed onto ``cis``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from gatekv.heads.base import HeadsScorer

__all__ = ["LinearGate", "LinearGateLayer"]


class LinearGateLayer(nn.Module):
    """One layer's gate: ``hidden_states (B, q, D) -> (B, H_kv, q)`` keep logits."""

    def __init__(self, hidden_size: int, num_kv_heads: int, hidden: int, act: str, eps: float, init_keep_logit: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        if hidden > 0:
            if act not in ACT2FN:
                raise ValueError(f"linear gate: unknown activation {act!r}")
            self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden, bias=False), ACT2FN[act])
            width = hidden
        else:
            self.mlp = nn.Identity()
            width = hidden_size
        self.out = nn.Linear(width, num_kv_heads, bias=True)
        nn.init.normal_(self.out.weight, std=0.02)  # small: every token starts near init_keep_logit
        nn.init.constant_(self.out.bias, init_keep_logit)

    def forward(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        h = self.norm(inputs["hidden_states"])
        return self.out(self.mlp(h)).transpose(1, 2)  # (B, H_kv, q)


class LinearGate(HeadsScorer):
    """A linear map (``hidden = 0``) or a small MLP per layer on RMSNorm(hidden states) -> H_kv keep logits."""

    head_type = "linear_gate"
    needs = frozenset({"hidden_states"})

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        return LinearGateLayer(
            c.fingerprint.hidden_size, c.fingerprint.num_kv_heads, c.hidden, c.act, c.rms_norm_eps, c.init_keep_logit
        )
