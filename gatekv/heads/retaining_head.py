"""Retaining head (Locret): per layer an MLP on concat(pre-RoPE q, k, v) of each token -> one score per KV head.

    x_t = concat(q_t (H_q d), k_t (H_kv d), v_t (H_kv d))        width (H_q + 2 H_kv) d, before RoPE
    s_t = W2 act(W1 x_t)                                          W1: -> hidden, W2: hidden -> H_kv, no biases

The score regresses the causal importance score (the max future pre-softmax logit a token receives, see
``gatekv.training.targets``). For Qwen3 the inputs are taken after q/k-norm; Phi-3's fused qkv is split first.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from gatekv.heads.base import HeadsScorer

__all__ = ["RetainingHead", "RetainingHeadLayer"]


class RetainingHeadLayer(nn.Module):
    """One layer's head: ``x (B, q, (H_q + 2 H_kv) d) -> (B, H_kv, q)``."""

    def __init__(self, input_width: int, hidden: int, num_kv_heads: int, act: str):
        super().__init__()
        if act not in ACT2FN:
            raise ValueError(f"retaining head: unknown activation {act!r}")
        self.up = nn.Linear(input_width, hidden, bias=False)
        self.act = ACT2FN[act]
        self.down = nn.Linear(hidden, num_kv_heads, bias=False)

    def forward(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(inputs["x"]))).transpose(1, 2)  # (B, H_kv, q)


class RetainingHead(HeadsScorer):
    """Locret retaining heads, one MLP per layer on pre-RoPE q/k/v (``hidden`` units, the model's activation)."""

    head_type = "retaining_head"
    needs = frozenset({"pre_rope"})

    def build_layer(self, layer_idx: int) -> nn.Module:
        c = self.config
        return RetainingHeadLayer(c.input_width, c.hidden, c.fingerprint.num_kv_heads, c.act)

    def layer_inputs(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"x": (B, q, (H_q + 2 H_kv) d)}``: concat of the pre-RoPE q, k, v of each token (heads flattened)."""
        q, k, v = features["pre_rope_queries"], features["pre_rope_keys"], features["pre_rope_values"]
        return {"x": torch.cat([t.transpose(1, 2).flatten(2) for t in (q, k, v)], dim=-1)}

    def stacked_content_scores(self, inputs: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        """All layers in two batched matmuls: ``{"x": (Ly, B, q, F)} -> (Ly, B, H_kv, q)``."""
        x = inputs["x"]
        up = self.layers[0].up.weight
        x = x.to(device=up.device, dtype=up.dtype)
        layers, batch, q, width = x.shape
        w_up = torch.stack([layer.up.weight for layer in self.layers])  # (Ly, hidden, F)
        w_down = torch.stack([layer.down.weight for layer in self.layers])  # (Ly, H_kv, hidden)
        hidden = self.layers[0].act(torch.bmm(x.reshape(layers, batch * q, width), w_up.transpose(1, 2)))
        scores = torch.bmm(hidden, w_down.transpose(1, 2))  # (Ly, B q, H_kv)
        return scores.reshape(layers, batch, q, -1).permute(0, 1, 3, 2).float()
