"""Budgets, keep plans and the Allocator interface.

An allocator turns every layer's scores into a :class:`KeepPlan`: per layer, batch row and KV head, how many
slots to keep and which ones (sorted by slot, i.e. by position). Protected slots (sinks, recent window) arrive as a
mask and are always kept: they count against the budget, and kernels never special-case them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gatekv.registry import Registry

__all__ = [
    "AllocationInput",
    "Allocator",
    "Budget",
    "KeepPlan",
    "available_allocators",
    "candidate_counts",
    "check_unit_interval",
    "get_allocator",
    "plan_from_counts",
    "ranking_scores",
    "register_allocator",
    "round_preserving_sum",
]


@dataclass(frozen=True)
class Budget:
    """A cache budget per KV head: a ratio of the prompt (``0 < value <= 1``, float) or a token count (int >= 1)."""

    value: float | int

    def __post_init__(self):
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"budget must be a float ratio in (0, 1] or an int token count, got {value!r}")
        if isinstance(value, float):
            if not (value > 0):
                raise ValueError(f"budget ratio must be > 0, got {value}")
            if value > 1:
                raise ValueError(f"budget ratio must be <= 1 (use an int for a token count), got {value}")
        elif value <= 0:
            raise ValueError(f"budget token count must be >= 1, got {value}")

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float)

    def tokens(self, lengths: torch.Tensor) -> torch.Tensor:
        """Tokens per KV head for prompts of ``lengths`` (B,) tokens: ``ceil(ratio * L)`` or the count, <= L."""
        if self.is_ratio:
            per_row = torch.ceil(lengths.double() * self.value).long()
        else:
            per_row = torch.full_like(lengths, int(self.value))
        return torch.minimum(per_row, lengths)


@dataclass
class KeepPlan:
    """Which slots every (layer, batch row, KV head) keeps.

    indices: per layer (B, H_kv, K_max) int64 slot indices, ascending within the first ``counts`` entries
             (entries past ``counts`` are padding with value 0)
    counts:  per layer (B, H_kv) int64 kept slots
    """

    indices: list[torch.Tensor]
    counts: list[torch.Tensor]

    def kept_mask(self, layer: int, num_slots: int) -> torch.Tensor:
        """(B, H_kv, num_slots) bool: True where the slot is kept in ``layer``."""
        indices, counts = self.indices[layer], self.counts[layer]
        # padding entries go to an extra slot that is cut off, so they never overwrite a kept slot
        mask = torch.zeros(*counts.shape, num_slots + 1, dtype=torch.bool, device=counts.device)
        rank = torch.arange(indices.shape[-1], device=counts.device)
        valid = rank < counts[..., None]
        mask.scatter_(2, torch.where(valid, indices, torch.full_like(indices, num_slots)), True)
        return mask[..., :num_slots]

    def total_kept(self) -> int:
        return int(sum(c.sum().item() for c in self.counts))


@dataclass
class AllocationInput:
    """What an allocator sees.

    scores:    per layer (B, H_kv, T_l) float32; ``-inf`` marks slots that are not candidates
    protected: per layer (B, H_kv, T_l) bool, candidates that must be kept (sinks, recent window)
    budget:    (B,) int64 tokens per KV head (average over heads and, for layer-wise allocators, layers), protected
               tokens included
    window:    size of the protected recent window (PyramidKV's ``w``)
    """

    scores: list[torch.Tensor]
    protected: list[torch.Tensor]
    budget: torch.Tensor
    window: int = 0


def candidate_counts(scores: torch.Tensor) -> torch.Tensor:
    """(B, H) number of candidate slots (score > -inf) of scores (B, H, T)."""
    return (scores > float("-inf")).sum(-1)


def ranking_scores(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Scores with protected slots forced to +inf (kept first), non-candidates stay -inf. (B, H, T) float32."""
    ranked = scores.float().nan_to_num(nan=-1e30, posinf=1e30)
    ranked = ranked.masked_fill(scores == float("-inf"), float("-inf"))
    return ranked.masked_fill(protected, float("inf"))


def plan_from_counts(scores: torch.Tensor, protected: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top ``counts[b, h]`` slots of each head (protected first), indices sorted ascending.

    scores: (B, H, T); protected: (B, H, T) bool; counts: (B, H) int64, between the protected and candidate counts
    returns (indices (B, H, K_max), counts (B, H))
    """
    ranked = ranking_scores(scores, protected)
    k_max = int(counts.max().item()) if counts.numel() else 0
    if k_max == 0:
        return torch.zeros(*counts.shape, 0, dtype=torch.long, device=scores.device), counts
    top = torch.topk(ranked, k_max, dim=-1, sorted=True).indices
    rank = torch.arange(k_max, device=scores.device)
    keep = rank < counts[..., None]
    # sort the kept ones ascending; padding entries go to the end (slot index T)
    padded = torch.where(keep, top, torch.full_like(top, scores.shape[-1]))
    indices = torch.sort(padded, dim=-1).values
    indices = torch.where(keep, indices, torch.zeros_like(indices))
    return indices, counts


class Allocator:
    """Base class: implement :meth:`layer_counts` (how many slots each head keeps); selection is shared.

    Abilities are declared here, not probed: an allocator that sets ``needs_window_attention`` gets every layer's
    window attention during prefill (:meth:`observe_layer`); one that sets ``cascade`` is re-allocated after each
    layer of the prefill (:meth:`cascade_allocate`). Either one observes the prefill itself (``observes_prefill``),
    so it cannot run on a shared prefill.
    """

    name: ClassVar[str] = ""
    needs_window_attention: ClassVar[bool] = False
    """Observes each layer's window attention during prefill (CAKE, D2O): :meth:`observe_layer` is called."""
    needs_guide: bool = False
    """Observes each scored layer's count guide (:meth:`observe_guide`): the raw scores of the scorer's ``guide``
    member (:meth:`gatekv.scorers.base.Scorer.take_guide`), or the session's scores when the scorer names none."""
    cascade: ClassVar[bool] = False
    """Allocated in cascade during prefill (CAKE): :meth:`cascade_allocate` runs after each layer is scored, so the
    prefill never holds more than the budget plus one uncompressed layer."""

    @property
    def uses_budget(self) -> bool:
        """Whether the kept amount follows the budget. False (the threshold allocator without a cap): the allocator
        decides how much each head keeps, so a budget that covers the whole prompt does not make compression a
        no-op."""
        return True

    @property
    def observes_prefill(self) -> bool:
        """Whether the allocator sees the prefill forward itself (cascade or window attention)."""
        return self.cascade or self.needs_window_attention

    def observe_layer(self, layer_idx: int, attention: torch.Tensor, candidates: torch.Tensor) -> None:
        """Window attention (B, H_q, w, T) softmax weights of layer ``layer_idx`` and its candidate slots (B, H_kv,
        T) bool; called during prefill when ``needs_window_attention`` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_window_attention but has no observe_layer()")

    def observe_context(self, layer_idx: int, ctx) -> None:
        """What the session calls when ``needs_window_attention`` is set: layer ``layer_idx``'s scored
        :class:`~gatekv.scorers.LayerContext`. The default hands its window attention and candidates to
        :meth:`observe_layer`; an allocator may read the context's cached statistics instead (``defensive_budget``
        reads ``ctx.defensive_scores``, which a DefensiveKV scorer of the same layer has already computed)."""
        self.observe_layer(layer_idx, ctx.window_attention(), ctx.candidates)

    def observe_guide(self, layer_idx: int, scores: torch.Tensor) -> None:
        """Count guide (B, H_kv, T) float32 of layer ``layer_idx`` (``-inf`` on non-candidates); called after each
        scoring of the layer when ``needs_guide`` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_guide but has no observe_guide()")

    def cascade_allocate(self, inputs: AllocationInput, num_layers: int, held: torch.Tensor | None = None) -> KeepPlan:
        """The plan of layers 0..m (``inputs`` holds their scores) with ``num_layers`` N in all; ``held``: (B,) tokens
        per head still held by layers m+1..N-1. Called during prefill when ``cascade`` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets cascade but has no cascade_allocate()")

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        """Per layer (B, H_kv) int64 kept counts, each between the protected and the candidate count."""
        raise NotImplementedError

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        """Build the plan: per-head counts from :meth:`layer_counts`, then each head's top slots."""
        counts = self.layer_counts(inputs)
        indices, kept = [], []
        for layer, layer_counts in enumerate(counts):
            cand = candidate_counts(inputs.scores[layer])
            prot = inputs.protected[layer].sum(-1)
            layer_counts = torch.minimum(torch.maximum(layer_counts, prot), cand)
            # a row whose budget covers every candidate keeps them all, whatever the allocator's schedule
            covered = inputs.budget.to(cand.device)[:, None] >= cand.amax(-1, keepdim=True)
            layer_counts = torch.where(covered, cand, layer_counts)
            idx, c = plan_from_counts(inputs.scores[layer], inputs.protected[layer], layer_counts)
            indices.append(idx)
            kept.append(c)
        return KeepPlan(indices, kept)

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


ALLOCATORS: Registry[Allocator] = Registry("allocator", Allocator)
"""The registered allocators: ``register_*`` (class decorator), ``available_*`` (sorted names), ``get_*`` (an instance from a
name and options, or the instance itself). Built-ins register when ``gatekv.allocators`` is imported."""


register_allocator, available_allocators, get_allocator = ALLOCATORS.register, ALLOCATORS.names, ALLOCATORS.get


def check_unit_interval(value, owner: str, field: str) -> float:
    """``value`` as a float if it is a number in [0, 1], else ``ValueError`` naming ``owner`` and ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {field} must be in [0, 1], got {value!r}")
    return float(value)


def round_preserving_sum(values: torch.Tensor, total: int) -> torch.Tensor:
    """Integers that sum to ``total`` and differ from ``values`` (1-D float, sum ~ total) by < 1 (largest remainder)."""
    floors = torch.floor(values).long()
    remainder = total - int(floors.sum().item())
    if remainder > 0:
        order = torch.argsort(values - floors, descending=True)
        floors[order[:remainder]] += 1
    elif remainder < 0:
        order = torch.argsort(values - floors)
        floors[order[: -remainder]] -= 1
    return floors

