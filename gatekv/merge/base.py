"""Merging: dropped tokens folded into kept ones while the cache is compacted (EMS, D2O, KVMerger, Razor).

A :class:`Merger` runs after the allocator: it sees one layer's slots (keys, values, scores) and the keep plan, and
says which dropped slots merge into which kept token with which weight (:class:`MergeSpec`). The compaction then
writes ``(x_kept + sum_e w_e x_e) / (1 + sum_e w_e)`` for keys and values (``gatekv.kernels.merge``). Positions
never change: a merged token keeps the RoPE position of the kept token.

Why a package of its own: a merger needs the keep plan *and* the keys, so it is neither a scorer (which must not
see plans) nor an allocator (which never sees keys); ``compress.py`` composes the three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from gatekv.registry import Registry

__all__ = [
    "MergeContext",
    "MergeSpec",
    "Merger",
    "available_mergers",
    "get_merger",
    "kept_ranks",
    "most_similar_kept",
    "register_merger",
    "spec_from_targets",
]


@dataclass
class MergeContext:
    """One layer right before compaction. Slot axis T as in ``LayerContext`` (padded per (row, KV head))."""

    layer_idx: int
    keys: torch.Tensor
    """(B, H_kv, T, d) post-RoPE keys of every slot."""
    values: torch.Tensor
    """(B, H_kv, T, d_v) values of every slot."""
    positions: torch.Tensor
    """(B, H_kv, T) int64 positions, -1 = no token."""
    scores: torch.Tensor
    """(B, H_kv, T) float32 the allocator's scores (``-inf`` = not a candidate)."""
    protected: torch.Tensor
    """(B, H_kv, T) bool sinks and recent window."""
    kept_indices: torch.Tensor
    """(B, H_kv, K) int64 kept slots, ascending within ``kept_counts``."""
    kept_counts: torch.Tensor
    """(B, H_kv) int64 kept slots per head."""

    @property
    def candidates(self) -> torch.Tensor:
        """(B, H_kv, T) bool real context tokens."""
        return self.scores > float("-inf")

    def kept_mask(self) -> torch.Tensor:
        """(B, H_kv, T) bool."""
        return kept_ranks(self.kept_indices, self.kept_counts, self.scores.shape[-1]) >= 0

    def dropped(self) -> torch.Tensor:
        """(B, H_kv, T) bool candidates the plan drops."""
        return self.candidates & ~self.kept_mask()


@dataclass
class MergeSpec:
    """Which dropped slots merge where (the arguments of ``CompressedLayer.compact(merge=...)``).

    sources: (B, H_kv, E) int64 dropped slots; targets: (B, H_kv, E) int64 rank of the kept token in the head's
    kept list; weights: (B, H_kv, E) float32 >= 0; counts: (B, H_kv) int64 valid entries (the rest is padding).
    """

    sources: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.sources, self.targets, self.weights, self.counts


def kept_ranks(kept_indices: torch.Tensor, kept_counts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, H, T) int64 rank of each slot in its head's kept list, -1 if not kept.

    kept_indices: (B, H, K) ascending within kept_counts (B, H)
    """
    batch, heads, k = kept_indices.shape
    ranks = torch.full((batch, heads, num_slots + 1), -1, dtype=torch.long, device=kept_indices.device)
    rank = torch.arange(k, device=kept_indices.device).expand(batch, heads, k)
    valid = rank < kept_counts[..., None]
    slots = torch.where(valid, kept_indices, torch.full_like(kept_indices, num_slots))
    ranks.scatter_(2, slots, torch.where(valid, rank, torch.full_like(rank, -1)))
    return ranks[..., :num_slots]


def most_similar_kept(
    keys: torch.Tensor, kept_indices: torch.Tensor, kept_counts: torch.Tensor, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot, the kept slot of the same head whose key is most cosine-similar.

    keys: (B, H, T, d); kept_indices: (B, H, K) ascending within kept_counts (B, H)
    returns (similarity (B, H, T) float32, -inf where the head keeps nothing; slot (B, H, T) int64)
    Computed in blocks of ``block`` slots: memory O(block * K), never T x T.
    """
    batch, heads, t, d = keys.shape
    k = kept_indices.shape[-1]
    unit = F.normalize(keys.float(), dim=-1)
    kept_unit = torch.gather(unit, 2, kept_indices[..., None].expand(batch, heads, k, d))  # (B, H, K, d)
    valid = torch.arange(k, device=keys.device) < kept_counts[..., None]  # (B, H, K)
    best = torch.full((batch, heads, t), float("-inf"), device=keys.device)
    slot = torch.zeros(batch, heads, t, dtype=torch.long, device=keys.device)
    if k == 0:
        return best, slot
    for t0 in range(0, t, block):
        similarity = unit[:, :, t0 : t0 + block] @ kept_unit.transpose(-1, -2)  # (B, H, blk, K)
        similarity = similarity.masked_fill(~valid[:, :, None, :], float("-inf"))
        value, rank = similarity.max(-1)
        best[:, :, t0 : t0 + block] = value
        slot[:, :, t0 : t0 + block] = torch.gather(kept_indices, 2, rank)
    return best, slot


def spec_from_targets(target_slots: torch.Tensor, weights: torch.Tensor, ctx: MergeContext) -> MergeSpec:
    """Pack a dense merge map into a :class:`MergeSpec`.

    target_slots: (B, H, T) int64 kept slot each dropped slot merges into, -1 = not merged; weights: (B, H, T)
    """
    batch, heads, t = target_slots.shape
    ranks = kept_ranks(ctx.kept_indices, ctx.kept_counts, t)
    merged = (target_slots >= 0) & ctx.dropped()
    counts = merged.sum(-1)
    e_max = int(counts.max()) if counts.numel() else 0
    # merged slots first, in slot order (stable sort of the "not merged" flag)
    order = torch.sort((~merged).to(torch.int8), dim=-1, stable=True).indices[..., :e_max]
    sources = order
    target_slot = torch.gather(target_slots.clamp(min=0), 2, order)
    targets = torch.gather(ranks, 2, target_slot).clamp(min=0)
    w = torch.gather(weights.float(), 2, order)
    valid = torch.arange(e_max, device=order.device) < counts[..., None]
    return MergeSpec(
        torch.where(valid, sources, torch.zeros_like(sources)),
        torch.where(valid, targets, torch.zeros_like(targets)),
        torch.where(valid, w, torch.zeros_like(w)),
        counts,
    )


class Merger:
    """Base class: implement :meth:`merge`."""

    name: ClassVar[str] = ""

    def merge(self, ctx: MergeContext) -> MergeSpec | None:
        """The merges of one layer's eviction (None = plain eviction)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


MERGERS: Registry[Merger] = Registry("merger", Merger)
"""The registered mergers: ``register_*`` (class decorator), ``available_*`` (sorted names), ``get_*`` (an instance from a
name and options, or the instance itself). Built-ins register when ``gatekv.merge`` is imported."""


register_merger = MERGERS.register
available_mergers = MERGERS.names
get_merger = MERGERS.get


def check_unit_interval(owner: str, name: str, value, low: float = 0.0, high: float = 1.0, open_high=False) -> float:
    """ValueError naming ``name`` unless ``value`` is a number in [low, high] (or [low, high) with open_high)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= high
    if ok and open_high and value >= high:
        ok = False
    if not ok:
        bracket = ")" if open_high else "]"
        raise ValueError(f"{owner}: {name} must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)
