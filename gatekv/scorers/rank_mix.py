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


def check_mix_options(weights: dict[str, float], combine: str = "sum", guarantee: dict[str, float] | None = None) -> None:
    """``ValueError`` naming the option unless ``weights`` maps labels to numbers >= 0 (not all 0), ``combine`` is
    ``sum``/``max`` and ``guarantee`` maps some of those labels to fractions in [0, 1]."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"rank_mix: weights must map labels to numbers, got {weights!r}")
    for label, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"rank_mix: weights[{label!r}] must be a number >= 0, got {weight!r}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"rank_mix: the weights must not all be 0, got {weights!r}")
    if combine not in ("sum", "max"):
        raise ValueError(f"rank_mix: combine must be 'sum' or 'max', got {combine!r}")
    guarantee = {} if guarantee is None else guarantee
    if not isinstance(guarantee, dict) or not set(guarantee) <= set(weights):
        raise ValueError(f"rank_mix: guarantee must map some of the scorers {sorted(weights)} to fractions, "
                         f"got {guarantee!r}")
    for label, fraction in guarantee.items():
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"rank_mix: guarantee[{label!r}] must be a fraction in [0, 1], got {fraction!r}")


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
    at. ``guarantee={label: f}`` puts that member's top ``ceil(f * n)`` of a head's ``n`` candidate slots above every
    other slot (ordered among themselves by the blend), so each kept count starts with them.

    scorers:   label -> scorer name or instance (at least two; none may replay the prompt)
    weights:   label -> weight (>= 0, not all 0); default equal weights
    combine:   ``sum`` or ``max``
    guarantee: label -> fraction in [0, 1] of that member's top slots ranked first (default none)
    """

    def __init__(self, scorers: dict[str, str | Scorer], weights: dict[str, float] | None = None,
                 combine: str = "sum", guarantee: dict[str, float] | None = None):
        self.combine = combine
        if not isinstance(scorers, dict) or len(scorers) < 2:
            raise ValueError(f"rank_mix: scorers must be a dict of at least two label -> scorer, got {scorers!r}")
        self.members = {label: get_scorer(scorer) for label, scorer in scorers.items()}
        replaying = [label for label, scorer in self.members.items() if scorer.replays]
        if replaying:
            raise ValueError(f"rank_mix: members may not replay the prompt, got {replaying}")
        weights = {label: 1.0 for label in scorers} if weights is None else weights
        if not isinstance(weights, dict) or set(weights) != set(scorers):
            raise ValueError(f"rank_mix: weights must name exactly the scorers {sorted(scorers)}, got {weights!r}")
        guarantee = {} if guarantee is None else guarantee
        check_mix_options(weights, combine, guarantee)
        self.weights = {label: float(weight) for label, weight in weights.items()}
        self.guarantee = {label: float(fraction) for label, fraction in guarantee.items() if fraction > 0}
        self.needs = frozenset().union(*(s.needs for s in self.members.values()))
        self.state_names = tuple(dict.fromkeys(n for s in self.members.values() for n in s.state_names))

    def trim(self, layer_idx: int, width: int) -> None:
        """Nothing is stored between forwards."""

    def score(self, ctx: LayerContext) -> torch.Tensor:
        mixed = torch.zeros(ctx.positions.shape, device=ctx.keys.device)
        guaranteed = torch.zeros(ctx.positions.shape, dtype=torch.bool, device=mixed.device)
        count = ctx.candidates.sum(-1, keepdim=True).to(mixed.device)  # (B, H_kv, 1) candidates per head
        for label, scorer in self.members.items():
            if self.weights[label] == 0 and label not in self.guarantee:
                continue
            scores = scorer.score(ctx)
            if scores.shape != ctx.positions.shape:
                raise ValueError(f"rank_mix: scorer {label!r} returned shape {tuple(scores.shape)}, "
                                 f"expected {tuple(ctx.positions.shape)}")
            ranks = within_head_ranks(scores.to(mixed.device), ctx.candidates)
            if label in self.guarantee:
                # ascending index among the candidates is rank * (n - 1); the top ceil(f * n) have index >= n - that
                index = torch.round(ranks * (count - 1).clamp(min=0))
                top = torch.ceil(self.guarantee[label] * count)
                guaranteed |= ctx.candidates.to(mixed.device) & (index >= count - top)
            weighted = self.weights[label] * ranks
            mixed = mixed + weighted if self.combine == "sum" else torch.maximum(mixed, weighted)
        return mixed + guaranteed * (sum(self.weights.values()) + 1.0)
