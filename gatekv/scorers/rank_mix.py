"""Rank mix: several scorers' rankings within each (row, KV head), blended by weight."""

from __future__ import annotations

import torch

from gatekv.scorers.base import LayerContext, Scorer, ScorerGroup, get_scorer, register_scorer


def within_head_ranks(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Normalised rank of every candidate slot within its (row, KV head): 1 for the highest score, 0 for the lowest
    (ties broken by slot order), 0 on non-candidate slots.

    scores: (B, H_kv, T) float; candidates: (B, H_kv, T) bool -> (B, H_kv, T) float32 in [0, 1]
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = masked.argsort(dim=-1, stable=True)  # ascending: non-candidates first
    ranks = torch.empty_like(masked)
    slots = torch.arange(masked.shape[-1], device=masked.device, dtype=masked.dtype)
    ranks.scatter_(-1, order, slots.expand_as(masked))
    count = candidates.sum(-1, keepdim=True)
    # non-candidates take ranks 0 .. T - count - 1; the candidates' lowest is T - count
    lowest = masked.shape[-1] - count
    normalised = (ranks - lowest) / (count - 1).clamp(min=1)
    return normalised.clamp(min=0.0).masked_fill(~candidates, 0.0)


def check_mix_options(weights: dict[str, float], combine: str = "sum", quota: dict[str, float] | None = None,
                      quota_of: str = "count", guide: str | None = None,
                      quota_prompt: dict[str, float] | None = None) -> None:
    """``ValueError`` naming the option unless ``weights`` maps labels to numbers >= 0 (not all 0), ``combine`` is
    ``sum``/``max``, ``quota`` maps some of those labels to shares in (0, 1] that sum to at most 1, ``quota_of``
    is ``count``/``free``, ``guide`` is None or one of the labels and ``quota_prompt`` maps some of the quota's
    labels to shares in (0, 1]."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"rank_mix: weights must map labels to numbers, got {weights!r}")
    for label, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"rank_mix: weights[{label!r}] must be a number >= 0, got {weight!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"rank_mix: the weights must not all be 0, got {weights!r}")
    if combine not in ("sum", "max"):
        raise ValueError(f"rank_mix: combine must be 'sum' or 'max', got {combine!r}")
    quota = {} if quota is None else quota
    if not isinstance(quota, dict) or not set(quota) <= set(weights):
        raise ValueError(f"rank_mix: quota must map some of the scorers {sorted(weights)} to shares, got {quota!r}")
    for label, share in quota.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"rank_mix: quota[{label!r}] must be a share in (0, 1], got {share!r}")
    if sum(quota.values()) > 1 + 1e-9:
        raise ValueError(f"rank_mix: the quota shares must sum to at most 1, got {quota!r}")
    if quota_of not in ("count", "free"):
        raise ValueError(f"rank_mix: quota_of must be 'count' or 'free', got {quota_of!r}")
    if guide is not None and guide not in weights:
        raise ValueError(f"rank_mix: guide must be one of the scorers {sorted(weights)}, got {guide!r}")
    quota_prompt = {} if quota_prompt is None else quota_prompt
    if not isinstance(quota_prompt, dict) or not set(quota_prompt) <= set(quota):
        raise ValueError(f"rank_mix: quota_prompt must map some of the quota's scorers {sorted(quota)} to shares of "
                         f"the prompt, got {quota_prompt!r}")
    for label, share in quota_prompt.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"rank_mix: quota_prompt[{label!r}] must be a share of the prompt in (0, 1], got {share!r}")


def split_mix_spec(spec) -> tuple[dict, dict]:
    """``(weights, options)`` of a mix given as ``{label: weight}`` or as the long form ``{"weights": {...},
    "quota": {...}, "quota_of": ..., "quota_prompt": {...}, "combine": ..., "guide": ...}``; ``ValueError`` naming
    what is off."""
    if not isinstance(spec, dict):
        raise ValueError(f"rank_mix must map labels to weights, got {spec!r}")
    if "weights" not in spec:
        return spec, {}
    options = {k: v for k, v in spec.items() if k != "weights"}
    unknown = sorted(set(options) - {"quota", "quota_of", "quota_prompt", "combine", "guide"})
    if unknown:
        raise ValueError(f"rank_mix takes weights, quota, quota_of, quota_prompt, combine and guide, got {unknown}")
    if not isinstance(spec["weights"], dict):
        raise ValueError(f"rank_mix weights must map labels to weights, got {spec['weights']!r}")
    return spec["weights"], options


@register_scorer("rank_mix")
class RankMixScorer(ScorerGroup):
    """Blend of several scorers' rankings: ``s_h[j] = sum_i w_i * rank_i,h[j]`` (``combine="sum"``) or
    ``max_i w_i * rank_i,h[j]`` (``combine="max"``: a slot stays if any member ranks it high enough, so each member's
    very top survives), with ``rank_i,h`` scorer i's normalised rank of slot j among the candidate slots of head h
    (1 = its top token, 0 = its last).

    Ranks, not raw scores, because the members' scores live on unrelated scales (attention probabilities, trained
    logits). Use it where two scorers rank different things well: e.g. trained retaining heads (long-range content)
    with DefensiveKV's window attention (what the latest queries read). Scores are within-head ranks, so pair it with
    an allocator that does not compare scores across heads or layers (``uniform``, ``defensive_budget``).

    A blend can bury what only one member finds: a needle the heads rank first but the window attention never looked
    at. ``quota={label: p}`` gives that member's own top ``p * k`` of every head's kept count ``k``, whatever the
    allocator makes ``k``; the blend fills the rest. The protected slots (sinks, recent window) are kept anyway, and
    a member that ranks them high spends its quota on them: ``quota_of="free"`` ranks only the unprotected slots, so
    each share is one of the ``k - protected`` slots the scores choose (``"count"``, the default: of ``k``).
    ``quota_prompt={label: c}`` bounds that member's quota by a share ``c`` of the row's tokens instead of the count:
    at a budget of ``b`` of the tokens its share of every count is ``min(p, c / b)``. A needle needs the same slots
    at any budget, so the quota that protects it need not grow with the budget, while the continuation of prose
    gains from every slot the blend gets (needs the session's budget: not on a shared prefill).

    scorers:   label -> scorer name or instance (at least two; none may replay the prompt)
    weights:   label -> weight (>= 0, not all 0); default equal weights
    combine:   ``sum`` or ``max``
    quota:     label -> share in (0, 1] of every kept count that goes to that member's own top (shares sum to <= 1)
    quota_of:  ``count`` (shares of the kept count) or ``free`` (of its unprotected part; needs the context's
               ``protected``)
    quota_prompt: label (with a quota) -> share ``c`` of the row's tokens that bounds its quota (``min(p, c / b)``)
    guide:     label of the member whose raw scores are the count guide of an allocator that splits counts by one
               (``defensive_budget`` with ``guide_share``): the blend's ranks say nothing across heads, a member's
               scores may (e.g. the retaining heads: their Ada-KV counts follow a needle)
    """

    def __init__(self, scorers: dict[str, str | Scorer], weights: dict[str, float] | None = None,
                 combine: str = "sum", quota: dict[str, float] | None = None, quota_of: str = "count",
                 guide: str | None = None, quota_prompt: dict[str, float] | None = None):
        self.combine, self.quota_of, self.guide = combine, quota_of, guide
        self._guide_scores: torch.Tensor | None = None
        if not isinstance(scorers, dict) or len(scorers) < 2:
            raise ValueError(f"rank_mix: scorers must be a dict of at least two label -> scorer, got {scorers!r}")
        self._take_members({label: get_scorer(scorer) for label, scorer in scorers.items()})
        replaying = [label for label, scorer in self.members.items() if scorer.replays]
        if replaying:
            raise ValueError(f"rank_mix: members may not replay the prompt, got {replaying}")
        weights = {label: 1.0 for label in scorers} if weights is None else weights
        if not isinstance(weights, dict) or set(weights) != set(scorers):
            raise ValueError(f"rank_mix: weights must name exactly the scorers {sorted(scorers)}, got {weights!r}")
        quota = {} if quota is None else quota
        check_mix_options(weights, combine, quota, quota_of, guide, quota_prompt)
        self.weights = {label: float(weight) for label, weight in weights.items()}
        self.quota = {label: float(share) for label, share in quota.items()}
        self.quota_prompt = {label: float(share) for label, share in (quota_prompt or {}).items()}

    def trim(self, layer_idx: int, width: int) -> None:
        """Nothing is stored between forwards."""

    def take_guide(self) -> torch.Tensor | None:
        """The ``guide`` member's raw scores from the last :meth:`score` (None without a guide)."""
        guide, self._guide_scores = self._guide_scores, None
        return guide

    def score(self, ctx: LayerContext) -> torch.Tensor:
        candidates = ctx.candidates.to(ctx.keys.device)
        if self.quota and self.quota_of == "free":
            if ctx.protected is None:
                raise ValueError("rank_mix: quota_of='free' needs the layer context's protected slots")
            candidates = candidates & ~ctx.protected.to(candidates.device)
        mixed = torch.zeros(ctx.positions.shape, device=ctx.keys.device)
        own_ranks = {}
        for label, scorer in self.members.items():
            if self.weights[label] == 0 and label not in self.quota and label != self.guide:
                continue
            scores = scorer.score(ctx)
            if scores.shape != ctx.positions.shape:
                raise ValueError(f"rank_mix: scorer {label!r} returned shape {tuple(scores.shape)}, "
                                 f"expected {tuple(ctx.positions.shape)}")
            if label == self.guide:
                self._guide_scores = scores.float()
            ranks = within_head_ranks(scores.to(mixed.device), candidates)
            if label in self.quota:
                own_ranks[label] = ranks
            weighted = self.weights[label] * ranks
            mixed = mixed + weighted if self.combine == "sum" else torch.maximum(mixed, weighted)
        if not self.quota:
            return mixed
        # a slot is in the top fraction q of a ranking iff its normalised rank r >= 1 - q; so the top k slots by
        # max_i (r_i - 1) / p_i (members with a quota) and (r_blend - 1) / (1 - sum p_i) are each such member's top
        # p_i * k and the blend's top (1 - sum p_i) * k (slots in both count once), for every count k
        shares = self._shares(ctx)
        blend_share = 1.0 - sum(shares.values())
        out = torch.full_like(mixed, float("-inf"))
        if isinstance(blend_share, torch.Tensor):  # per row; a row whose quotas fill every count ranks the blend last
            out = (within_head_ranks(mixed, candidates) - 1) / blend_share.clamp(min=1e-9)
        elif blend_share > 1e-9:
            out = (within_head_ranks(mixed, candidates) - 1) / blend_share
        for label, share in shares.items():
            out = torch.maximum(out, (own_ranks[label] - 1) / share)
        return out

    @property
    def needs_budget(self) -> bool:
        """Whether :meth:`score` needs the step's budget (``LayerContext.budget_share``): with ``quota_prompt``."""
        return bool(self.quota_prompt)

    def _shares(self, ctx: LayerContext) -> dict:
        """Each quota member's share of every count: a float, or (B, 1, 1) per row with ``quota_prompt``."""
        if not self.quota_prompt:
            return dict(self.quota)
        if ctx.budget_share is None:
            raise ValueError("rank_mix: quota_prompt needs the session's budget, which a shared prefill (forked at "
                             "several budgets) does not have")
        budget = ctx.budget_share.to(ctx.keys.device, torch.float32).clamp(min=1e-6)[:, None, None]
        return {label: (torch.clamp(self.quota_prompt[label] / budget, max=share) if label in self.quota_prompt
                        else share) for label, share in self.quota.items()}
