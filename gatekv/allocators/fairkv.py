"""FairKV: balance head-wise budgets across tensor-parallel shards (head-to-shard assignment, optional rebalance)."""

from __future__ import annotations

import torch

from gatekv.allocators.base import (
    AllocationInput,
    Allocator,
    KeepPlan,
    get_allocator,
    plan_from_counts,
    register_allocator,
    round_preserving_sum,
)

__all__ = ["FairKVAllocator", "assign_heads", "balance_report", "check_tp", "contiguous_assignment", "shard_loads"]


def check_tp(tp: int, num_kv_heads: int) -> None:
    """ValueError unless ``tp`` is an int >= 1 dividing ``num_kv_heads``."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"fairkv: tp (tensor-parallel degree) must be an int >= 1, got {tp!r}")
    if num_kv_heads % tp:
        raise ValueError(f"fairkv: tp (tensor-parallel degree) {tp} does not divide the {num_kv_heads} KV heads")


def contiguous_assignment(num_kv_heads: int, tp: int) -> torch.Tensor:
    """(H_kv,) shard of each head under plain tensor parallelism: heads ``s*H/tp .. (s+1)*H/tp - 1`` on shard s."""
    check_tp(tp, num_kv_heads)
    return torch.arange(num_kv_heads) // (num_kv_heads // tp)


def assign_heads(loads: torch.Tensor, tp: int) -> torch.Tensor:
    """Longest-processing-time greedy: heads by decreasing load, each to the least-loaded shard not yet full.

    loads: (H_kv,) kept tokens of each head; every shard gets exactly ``H_kv / tp`` heads (equal compute)
    returns: (H_kv,) int64 shard of each head
    """
    heads = loads.numel()
    check_tp(tp, heads)
    per_shard = heads // tp
    shard_load = [0.0] * tp
    shard_heads = [0] * tp
    assignment = torch.zeros(heads, dtype=torch.long)
    for head in torch.argsort(loads.double().cpu(), descending=True, stable=True).tolist():
        open_shards = [s for s in range(tp) if shard_heads[s] < per_shard]
        shard = min(open_shards, key=lambda s: (shard_load[s], s))
        assignment[head] = shard
        shard_load[shard] += float(loads[head])
        shard_heads[shard] += 1
    return assignment


def shard_loads(counts: list[torch.Tensor], assignments: list[torch.Tensor], tp: int) -> torch.Tensor:
    """(num_layers, tp) kept tokens per shard, summed over batch rows.

    counts: per layer (B, H_kv) kept counts; assignments: per layer (H_kv,) shard of each head
    """
    out = torch.zeros(len(counts), tp, dtype=torch.float64)
    for layer, (c, a) in enumerate(zip(counts, assignments)):
        out[layer].index_add_(0, a.cpu(), c.sum(0).double().cpu())
    return out


def _imbalance(loads: torch.Tensor) -> float:
    """Decode time ~ sum over layers of the slowest shard; returned relative to a perfect split (1.0 = balanced)."""
    mean = float(loads.mean(-1).sum())
    return float(loads.amax(-1).sum()) / mean if mean > 0 else 1.0


def balance_report(counts: list[torch.Tensor], tp: int) -> dict[str, float]:
    """Max/mean shard load of head-wise ``counts`` (per layer (B, H_kv)) with the contiguous and the LPT assignment.

    returns {"before": ratio, "after": ratio}, ratio = sum_l max_s load / sum_l mean_s load (>= 1, 1 = balanced)
    """
    heads = counts[0].shape[-1]
    before = [contiguous_assignment(heads, tp)] * len(counts)
    after = [assign_heads(c.sum(0), tp) for c in counts]
    return {"before": _imbalance(shard_loads(counts, before, tp)), "after": _imbalance(shard_loads(counts, after, tp))}


@register_allocator("fairkv")
class FairKVAllocator(Allocator):
    """Wraps a head-wise allocator (``inner``, e.g. adakv): its plan, plus an LPT head-to-shard assignment per
    layer (``last_assignment``). With ``rebalance=True`` the counts are then rescaled shard by shard towards the mean
    shard load (layer and row totals preserved; heads stay between their protected and candidate counts, so the
    balance is best effort).

    tp: tensor-parallel degree, must divide the KV heads; inner: allocator name; inner_options: its options.
    """

    def __init__(self, tp: int = 2, inner: str = "adakv", rebalance: bool = False, **inner_options):
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"fairkv: tp (tensor-parallel degree) must be an int >= 1, got {tp!r}")
        if not isinstance(rebalance, bool):
            raise ValueError(f"fairkv: rebalance must be a bool, got {rebalance!r}")
        self.tp = tp
        self.rebalance = rebalance
        self.inner = get_allocator(inner, **inner_options)
        self.last_assignment: list[torch.Tensor] = []

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        check_tp(self.tp, inputs.scores[0].shape[1])
        plan = self.inner.allocate(inputs)
        if self.rebalance:
            counts = [self._rebalance(c, inputs.protected[l].sum(-1), (s > float("-inf")).sum(-1))
                      for l, (c, s) in enumerate(zip(plan.counts, inputs.scores))]
            indices, kept = [], []
            for layer, c in enumerate(counts):
                idx, c = plan_from_counts(inputs.scores[layer], inputs.protected[layer], c)
                indices.append(idx)
                kept.append(c)
            plan = KeepPlan(indices, kept)
        self.last_assignment = [assign_heads(c.sum(0), self.tp) for c in plan.counts]
        return plan

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        return self.allocate(inputs).counts

    def _rebalance(self, counts: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """counts (B, H_kv) -> counts with each row's shard totals pulled to the mean under the LPT assignment."""
        out = counts.clone()
        for b in range(counts.shape[0]):
            row = counts[b].double()
            assignment = assign_heads(row, self.tp)
            total = int(row.sum())
            targets = round_preserving_sum(torch.full((self.tp,), total / self.tp, dtype=torch.float64), total)
            for shard in range(self.tp):
                heads = (assignment == shard).nonzero().flatten().to(counts.device)
                load = row[heads]
                if float(load.sum()) > 0:
                    share = load / load.sum() * targets[shard]
                else:
                    share = torch.full_like(load, float(targets[shard]) / heads.numel())
                scaled = round_preserving_sum(share.cpu(), int(targets[shard])).to(counts.device)
                out[b, heads] = torch.minimum(torch.maximum(scaled, low[b, heads]), high[b, heads])
        return out
