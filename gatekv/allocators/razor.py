"""RazorAttention: retrieval heads keep the whole cache; every other head keeps sinks + window + one carrier."""

from __future__ import annotations

import json
import os

import torch

from gatekv.allocators.base import AllocationInput, Allocator, KeepPlan, register_allocator

__all__ = ["RazorAllocator", "load_retrieval_heads"]


def load_retrieval_heads(source) -> set[tuple[int, int]]:
    """(layer, KV head) pairs of the retrieval heads.

    source: a list of (layer, kv_head) pairs, or a JSON file holding such a list, or the file written by
            ``gatekv.scorers.retrieval_heads`` (its top ``heads_per_layer`` query heads per layer by echo + induction
            score, mapped to their KV heads).
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source) as handle:
            data = json.load(handle)
        if isinstance(data, dict):
            try:
                fingerprint = data["fingerprint"]
                scores = torch.tensor(data["echo"]) + torch.tensor(data["induction"])  # (layers, H_q)
                group = int(fingerprint["num_q_heads"]) // int(fingerprint["num_kv_heads"])
                k = int(data.get("heads_per_layer", 1))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"razor: retrieval_heads file {source} is not a retrieval-heads result ({error})") from None
            top = scores.topk(k, dim=-1).indices
            return {(layer, int(q) // group) for layer in range(top.shape[0]) for q in top[layer].tolist()}
        source = data
    pairs = set()
    for item in source:
        if isinstance(item, (str, bytes)) or len(item) != 2 or not all(isinstance(v, int) and v >= 0 for v in item):
            raise ValueError(f"razor: retrieval_heads entries must be (layer, kv_head) int pairs, got {item!r}")
        pairs.add((int(item[0]), int(item[1])))
    return pairs


@register_allocator("razor")
class RazorAllocator(Allocator):
    """Retrieval heads keep every candidate; every other head keeps its protected slots (sinks, recent window) and
    the most recent unprotected candidate, the *carrier* that merger ``razor`` turns into the compensation token
    (mean of the dropped keys and values). The budget is ignored: the cache size follows the share of retrieval
    heads. retrieval_heads: see :func:`load_retrieval_heads` (empty = none).
    """

    def __init__(self, retrieval_heads=()):
        self.retrieval_heads = sorted(load_retrieval_heads(retrieval_heads))

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        heads = set(self.retrieval_heads)
        indices, counts = [], []
        for layer, (scores, protected) in enumerate(zip(inputs.scores, inputs.protected)):
            batch, num_heads, t = scores.shape
            candidates = scores > float("-inf")
            slot = torch.arange(t, device=scores.device).expand(batch, num_heads, t)
            free = candidates & ~protected
            carrier = torch.where(free, slot, torch.full_like(slot, -1)).amax(-1, keepdim=True)
            keep = protected | (slot == carrier)
            retrieval = torch.tensor([(layer, h) in heads for h in range(num_heads)], device=scores.device)
            keep = torch.where(retrieval[None, :, None], candidates, keep & candidates)
            count = keep.sum(-1)
            k_max = int(count.max()) if count.numel() else 0
            order = torch.sort(torch.where(keep, slot, torch.full_like(slot, t)), dim=-1).values[..., :k_max]
            valid = torch.arange(k_max, device=scores.device) < count[..., None]
            indices.append(torch.where(valid, order, torch.zeros_like(order)))
            counts.append(count)
        return KeepPlan(indices, counts)

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        return self.allocate(inputs).counts
