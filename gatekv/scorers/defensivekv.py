"""DefensiveKV: pooled window attention with max aggregation and a mean floor (optionally CriticalKV-reweighted)."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer
from gatekv.window_scores import check_pooling


def value_output_norms(values: torch.Tensor, module: torch.nn.Module, group_size: int) -> torch.Tensor:
    """CriticalKV's projected value norm: c_h[j] = mean over g in G(h) of ||W_O^g v_j||_1.

    values: (B, H_kv, T, d_v) values of every slot; module: the attention module (its ``o_proj`` weight is
    (D, H_q * d_v): query head g owns columns ``g*d_v:(g+1)*d_v``) -> (B, H_kv, T) float32.
    """
    o_proj = getattr(module, "o_proj", None)
    if o_proj is None or not hasattr(o_proj, "weight"):
        raise ValueError(f"defensivekv: critical=True needs the attention module's o_proj, {type(module).__name__} has none")
    batch, kv_heads, t, d_v = values.shape
    weight = o_proj.weight.float()  # (D, H_q * d_v)
    norms = torch.zeros(batch, kv_heads, t, device=values.device)
    for h in range(kv_heads):
        v = values[:, h].float()  # (B, T, d_v)
        for g in range(h * group_size, (h + 1) * group_size):
            columns = weight[:, g * d_v : (g + 1) * d_v]  # (D, d_v)
            norms[:, h] += (v @ columns.T).abs().sum(-1)  # one query head at a time: O(B*T*D) memory
    return norms / group_size


@register_scorer("defensivekv")
class DefensiveKVScorer(Scorer):
    """DefensiveKV (Feng et al., 2025): defensive (worst-case) aggregation of window attention.

    With A (B, H_q, w, T) the window attention:

    1. every row A[g, i, :] is 1-D pooled over slots and rescaled so it keeps its row mass
       (``P[g, i, :] = pool(A[g, i, :]) * sum_j A[g, i, j] / sum_j pool(A[g, i, :])[j]``);
    2. m_h[j] = max over window queries i and group heads g in G(h) of P[g, i, j] (max, not mean);
    3. s_h[j] = max(m_h[j], mean over candidate slots j' of m_h[j']) (the mean floor: a token no window query
       looked at still ranks as high as an average one);
    4. ``critical=True``: s_h[j] *= c_h[j] / mean_j' c_h[j'] with c_h[j] = mean over g in G(h) of ||W_O^g v_j||_1
       (CriticalKV's projected value norm; CriticalKV's extra 90%-mass first stage is not applied).

    Scores are attention probabilities (rows sum to at most 1; the CriticalKV factor has mean 1 per head), so they
    are on the same scale in every layer: a global allocator (Layer-DefensiveKV) may compare them across layers.
    Returns (B, H_kv, T) float32.
    """

    def __init__(self, window: int | None = None, kernel_size: int = 5, pooling: str = "avg", critical: bool = False):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"defensivekv: window must be a positive int or None, got {window!r}")
        check_pooling(kernel_size, pooling, "defensivekv")
        if not isinstance(critical, bool):
            raise ValueError(f"defensivekv: critical must be a bool, got {critical!r}")
        self.window = window
        self.kernel_size = kernel_size
        self.pooling = pooling
        self.critical = critical

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = ctx.defensive_scores(self.window, self.kernel_size, self.pooling)
        candidates = ctx.candidates.float()
        if self.critical:
            norms = value_output_norms(ctx.values, ctx.module, ctx.group_size)
            mean_norm = (norms * candidates).sum(-1, keepdim=True) / candidates.sum(-1, keepdim=True).clamp(min=1.0)
            scores = scores * norms / mean_norm.clamp(min=1e-30)
        return scores
