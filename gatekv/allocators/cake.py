"""CAKE: layer budgets from each layer's attention dispersion and shift, allocated in cascade during prefill."""

from __future__ import annotations

import math

import torch

from gatekv.allocators.base import AllocationInput, Allocator, KeepPlan, candidate_counts, register_allocator
from gatekv.allocators.global_topk import plan_exact_counts

__all__ = ["CakeAllocator", "layer_preference", "water_fill"]


def layer_preference(attention: torch.Tensor, tau1: float = 1.0, tau2: float = 1.0) -> torch.Tensor:
    """CAKE's preference ``P = H^(1/tau1) * V^(1/tau2)`` of one layer, per batch row.

    attention: (B, H_q, w, T) softmax weights of the w window queries over the T slots (rows of padding queries
               are all zero and ignored)
    returns:   (B,) float64. ``H`` = entropy ``-sum_j A log A`` of a query's attention, averaged over the heads and
               real window queries (spatial dispersion); ``V`` = ``sum_j Var_i A[i, j]`` over the window queries,
               averaged over the heads (temporal shift).
    """
    a = attention.double()
    real = a.sum(-1) > 0  # (B, H_q, w)
    entropy = -(a * torch.log(a.clamp(min=1e-30))).sum(-1)  # (B, H_q, w)
    n = real.sum(-1).clamp(min=1)  # (B, H_q)
    dispersion = (entropy * real).sum(-1) / n  # (B, H_q)
    mean = (a * real[..., None]).sum(-2) / n[..., None]  # (B, H_q, T)
    variance = (((a - mean[:, :, None]) ** 2) * real[..., None]).sum(-2) / n[..., None]
    shift = variance.sum(-1)  # (B, H_q)
    h = dispersion.mean(-1).clamp(min=0)
    v = shift.mean(-1).clamp(min=0)
    return h ** (1.0 / tau1) * v ** (1.0 / tau2)


def water_fill(preference: torch.Tensor, total: float, caps: torch.Tensor) -> torch.Tensor:
    """Real budgets ``x_l = min(cap_l, lam * P_l)`` with ``sum x = min(total, sum caps)`` (cap with redistribution).

    preference: (N,) >= 0 (all zero = equal preference); total: tokens to share; caps: (N,) >= 0
    returns:    (N,) float64
    """
    preference = preference.double().clamp(min=0)
    caps = caps.double()
    if not bool((preference > 0).any()):
        preference = torch.ones_like(preference)
    budget = torch.zeros_like(preference)
    total = min(float(total), float(caps.sum()))
    free = torch.ones_like(preference, dtype=torch.bool)
    # each pass either fits the rest proportionally or saturates at least one layer at its cap
    for _ in range(preference.numel() + 1):
        left = total - float(budget[~free].sum())
        weight = torch.where(free, preference, torch.zeros_like(preference))
        if float(weight.sum()) <= 0:  # only zero-preference layers have room left: split the rest equally
            weight = free.double()
        if left <= 1e-12 or float(weight.sum()) <= 0:
            break
        share = weight / weight.sum() * left
        over = free & (share > caps)
        if not bool(over.any()):
            budget = torch.where(free, share, budget)
            break
        budget = torch.where(over, caps, budget)
        free &= ~over
    return budget


@register_allocator("cake")
class CakeAllocator(Allocator):
    """``B_l = P_l / sum P * B_total``, capped at ``L - w`` with the excess redistributed; every head of layer l
    keeps ``B_l + w`` slots. ``B_total = N * (B - w)`` per head (B = budget per head, w = window, N = layers).

    Preferences come from :meth:`observe_layer`, which ``compress()`` calls with each layer's window attention
    (``needs_window_attention``); a layer never observed gets preference 1 (equal split).

    Cascade (``cascade = True``): during prefill ``compress()`` calls :meth:`cascade_allocate` after each layer m is
    scored; it re-allocates ``B_total`` over layers ``0..m`` and the session re-evicts them with their stored
    scores, so the cache never holds more than ``B_total`` (plus rounding, at most one token per layer and head)
    plus the one layer being prefilled. Intermediate budgets are rounded up, which keeps every layer's budget
    non-increasing along the cascade, so after a one-shot prefill the kept tokens equal the non-cascade CAKE's. In a
    chunked prefill the later layers still hold their previous chunk's budgets, so the prefix shares what they
    leave (the bound holds; the result may differ from the non-cascade allocation).

    tau1, tau2: temperatures (> 0) of the entropy and variance terms.
    """

    cascade = True
    needs_window_attention = True

    def __init__(self, tau1: float = 1.0, tau2: float = 1.0):
        for name, value in (("tau1", tau1), ("tau2", tau2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"cake: {name} must be a finite number > 0, got {value!r}")
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self._preference: dict[int, torch.Tensor] = {}
        self._length: dict[int, torch.Tensor] = {}

    # -- session hooks ----------------------------------------------------------------------------------------------
    def observe_layer(self, layer_idx: int, attention: torch.Tensor, candidates: torch.Tensor) -> None:
        """Record layer ``layer_idx``'s preference and length before any eviction.

        attention: (B, H_q, w, T) window attention; candidates: (B, H_kv, T) bool slots that may be kept
        """
        # one query (a decode step) has no variance: keep the preference the prompt's window gave
        if attention.shape[2] > 1 or layer_idx not in self._preference:
            self._preference[layer_idx] = layer_preference(attention, self.tau1, self.tau2).cpu()
        self._length[layer_idx] = candidates.sum(-1).amax(-1).cpu()

    def reset(self) -> None:
        """Forget the observed preferences and lengths."""
        self._preference.clear()
        self._length.clear()

    # -- allocation -------------------------------------------------------------------------------------------------
    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        return plan_exact_counts(inputs, self.layer_counts(inputs))

    def cascade_allocate(self, inputs: AllocationInput, num_layers: int, held: torch.Tensor | None = None) -> KeepPlan:
        """Plan for the prefix ``0..m`` (``m + 1 = len(inputs.scores)``) of a ``num_layers``-layer model.

        held: (B,) tokens per head the later layers ``m+1..N-1`` still hold (chunked prefill: their budgets from the
              previous chunk; 0 in a one-shot prefill); the prefix shares what they leave of ``B_total``. A layer
              never grows here: its count is at most what it holds.
        """
        final = len(inputs.scores) == num_layers
        return plan_exact_counts(inputs, self._counts(inputs, num_layers, final, held))

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        """Per layer (B, H_kv) kept counts ``B_l + w``."""
        return self._counts(inputs, len(inputs.scores), final=True)

    def budgets(
        self, inputs: AllocationInput, num_layers: int | None = None, final: bool = True, held: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, m) integer layer budgets ``B_l`` (window excluded) for the first ``m`` layers of ``inputs``.

        num_layers: N (default m); final: round to the exact total (else round up: a cascade stage);
        held: (B,) tokens per head held by layers m..N-1 (see :meth:`cascade_allocate`)
        """
        num_layers = len(inputs.scores) if num_layers is None else num_layers
        layers = len(inputs.scores)
        w = inputs.window
        batch = inputs.budget.shape[0]
        preference = torch.stack(
            [self._preference.get(l, torch.ones(batch, dtype=torch.float64)) for l in range(layers)], -1
        )
        length = torch.stack(
            [self._length.get(l, candidate_counts(inputs.scores[l]).amax(-1).cpu()) for l in range(layers)], -1
        )
        out = torch.zeros(batch, layers, dtype=torch.long)
        for b in range(batch):
            total = num_layers * max(int(inputs.budget[b]) - w, 0)
            if held is not None and layers < num_layers:
                total = max(total - (int(held[b]) - (num_layers - layers) * w), 0)
            caps = (length[b] - w).clamp(min=0)
            real = water_fill(preference[b], total, caps)
            if final:
                # largest remainder; caps are integers, so rounding never exceeds them
                out[b] = _round_capped(real, min(total, int(caps.sum())), caps)
            else:
                out[b] = torch.minimum(torch.ceil(real - 1e-9).long(), caps)
        return out

    def _counts(self, inputs: AllocationInput, num_layers: int, final: bool, held=None) -> list[torch.Tensor]:
        budgets = self.budgets(inputs, num_layers, final, held)
        counts = []
        for layer, scores in enumerate(inputs.scores):
            per_row = (budgets[:, layer] + inputs.window).to(scores.device)
            counts.append(per_row[:, None].expand(scores.shape[0], scores.shape[1]).clone())
        return counts


def _round_capped(values: torch.Tensor, total: int, caps: torch.Tensor) -> torch.Tensor:
    """Integers <= caps, summing to ``total``, each within 1 of ``values`` (largest remainder among free layers)."""
    floors = torch.floor(values + 1e-9).long()
    floors = torch.minimum(floors, caps)
    remainder = total - int(floors.sum())
    if remainder > 0:
        fraction = (values - floors).masked_fill(floors >= caps, float("-inf"))
        order = torch.argsort(fraction, descending=True, stable=True)
        floors[order[:remainder]] += 1
    return floors
