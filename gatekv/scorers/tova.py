"""TOVA: attention of the last query, averaged over all heads of the layer."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer


@register_scorer("tova")
class TOVAScorer(Scorer):
    """Score of slot j = mean over the layer's query heads of the last query's attention weight on j.

    TOVA averages over heads, so every KV head of a layer receives the same ranking.
    """

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = ctx.window_attention(1)  # (B, H_q, 1, T)
        mean = attention[:, :, -1].mean(dim=1)  # (B, T)
        return mean[:, None, :].expand(-1, ctx.num_kv_heads, -1).contiguous()
