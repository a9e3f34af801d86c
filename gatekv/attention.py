"""The attention function gatekv registers with transformers, and the per-step attention + scoring behind it.

Inside :func:`gatekv.compress` every attention module of the model runs :func:`_ragged_attention_forward` (registered
under ``ATTENTION_NAME`` with ``AttentionInterface``). It finds the :class:`SessionAttention` the module is attached
to, which attends the layer's queries over its ragged :class:`~gatekv.cache.CompressedCache` segment and, while the
session is scoring, builds the layer's :class:`~gatekv.scorers.LayerContext`, runs the scorer and stores the
layer's ``(scores, protected)`` for the allocator. Attaching is undone on exit: no module stays routed here.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable

import torch

from gatekv import kernels
from gatekv.allocators import Allocator
from gatekv.cache import CompressedCache
from gatekv.models import ModelSpec
from gatekv.scorers import LayerContext, Scorer, ScorerGroup
from gatekv.stats import CompressionStats

__all__ = ["ATTENTION_NAME", "ScorerGroup", "SessionAttention", "attach", "detach"]

ATTENTION_NAME = "gatekv_ragged"
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, SessionAttention]" = weakref.WeakKeyDictionary()


def _ragged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered with transformers' AttentionInterface under ``ATTENTION_NAME``.

    query: (B, H_q, q, d) post-RoPE. key/value: (B, H_kv, q, d) the new tokens, as ``CompressedCache.update``
    returned them; the session attends over the layer's ragged cache (which holds exactly them after the first
    forward into an empty cache). Returns ``((B, q, H_q, d_v), None)``.
    """
    attention = _SESSIONS.get(module)
    if attention is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} is only usable inside gatekv.compress()")
    scale = scaling if scaling is not None else module.head_dim**-0.5
    output = attention.attend(module, query, key, value, scale, kwargs.get("sliding_window"))
    return output.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _ragged_attention_forward)


def attach(attention: "SessionAttention", modules) -> None:
    """Route the attention of ``modules`` to ``attention`` (registering the attention function once);
    ``RuntimeError`` if one of them is already attached (the model is inside another ``compress()``)."""
    modules = list(modules)
    if any(module in _SESSIONS for module in modules):
        raise RuntimeError("this model is already inside a gatekv.compress() context")
    _register_attention()
    for module in modules:
        _SESSIONS[module] = attention


def detach(modules) -> None:
    """Undo :func:`attach` for ``modules``."""
    for module in modules:
        _SESSIONS.pop(module, None)


class SessionAttention:
    """Attention and scoring of one session's layers.

    spec:             the model's layout (layers, attention modules)
    scorer:           scores each layer's slots while ``scoring`` is on
    allocator:        gets each layer's window attention when it declares ``needs_window_attention``
    window, sinks:    the protected recent window and first tokens
    observe_window:   the observation window (the last prompt tokens whose attention is observed); None = window
    after_layer:      called with the layer index after a layer is scored (the session's cascade step)

    State the session sets: ``cache`` and ``stats`` (the current ones), ``scoring``, ``observer_from`` ((B,) first
    position of observer tokens, which are scored as queries but are not candidates), ``replay_chunk`` (the replay
    forward being scored), ``row_start`` ((B,) each row's first position, where the sinks are),
    ``prompt_end`` ((B,) each row's last prompt position), ``budget_share`` ((B,) the step's kept tokens per head as a
    share of the row's tokens; None: not known). Filled here:
    ``scores`` (layer -> (scores, protected), each (B, H_kv, T)) and ``captured`` (per layer, the inputs the
    scorer asked for).
    """

    def __init__(self, spec: ModelSpec, scorer: Scorer, allocator: Allocator, window: int, sinks: int,
                 after_layer: Callable[[int], None] | None = None, observe_window: int | None = None):
        self.spec, self.scorer, self.allocator = spec, scorer, allocator
        self.window, self.sinks = window, sinks
        self.observers = max(window if observe_window is None else observe_window, 1)
        self.after_layer = after_layer
        self.cache: CompressedCache | None = None
        self.stats = CompressionStats()
        self.scoring = False
        self.observer_from: torch.Tensor | None = None
        self.replay_chunk = None
        self.row_start: torch.Tensor | None = None
        self.prompt_end: torch.Tensor | None = None
        self.budget_share: torch.Tensor | None = None
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.captured: list[dict] = [{} for _ in range(spec.num_layers)]

    def attend(self, module, query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, scale: float,
               sliding_window) -> torch.Tensor:
        """Attention of ``query`` (B, H_q, q, d) over the layer's cache (``new_keys``/``new_values`` (B, H_kv, q, d)
        already appended); scores the layer when the session is scoring. Returns (B, H_q, q, d_v)."""
        cache = self.cache
        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx]
        query_positions = cache.pending_positions
        # One decode token over real, older tokens inside any sliding window: no mask is needed.
        unmasked = (
            query.shape[2] == 1
            and not layer.has_padding
            and (sliding_window is None or bool((query_positions[:, 0] - layer.min_position < sliding_window).all()))
        )
        q = query.shape[2]
        # The first forward into an empty cache without padding: the cache holds exactly this forward's keys and
        # values, so they are attended (and scored) as the model's own SDPA call does, on the tensors the model
        # computed: no padded copy of the cache, no general masked ragged path (2-3x slower on CPUs).
        fresh = (
            q > 1 and new_keys.shape[2] == q and not layer.has_padding and not layer.state
            and bool((layer.lengths == q).all())
        )
        if fresh and sliding_window is None:
            output = torch.nn.functional.scaled_dot_product_attention(
                query, new_keys.to(query.dtype), new_values.to(query.dtype), is_causal=True, scale=scale,
                enable_gqa=new_keys.shape[1] != query.shape[1],
            )
        else:
            output = kernels.ragged_attention(
                query, query_positions, layer.keys, layer.values, layer.positions, layer.starts, layer.lengths, scale,
                sliding_window, unmasked=unmasked, host_layout=layer.host_layout(),
                validate=not unmasked,  # a decode step over buffers the cache built: the checks cost ~ the attention
                flat_mask=layer.flat_mask() if unmasked else None,
            )
        if self.scoring:
            start = time.perf_counter()
            dense = None
            if fresh:  # what dense_view() would copy out of the flat buffers, already at hand
                positions = query_positions[:, None, :].expand(layer.batch_size, layer.num_heads, q)
                dense = (new_keys, new_values, positions, {})
            self.score_layer(module, layer_idx, query, query_positions, scale, dense)
            self.stats.score_seconds += time.perf_counter() - start
        return output

    def score_layer(self, module, layer_idx: int, query, query_positions, scale: float, dense=None) -> None:
        """Score layer ``layer_idx``'s slots and store ``(scores, protected)``; ``dense``: its ``dense_view()`` when
        the caller already has it. query: (B, H_q, q, d); query_positions: (B, q)."""
        layer = self.cache.layers[layer_idx]
        keys, values, positions, state = layer.dense_view() if dense is None else dense
        batch, heads = layer.batch_size, layer.num_heads
        q = query.shape[2]
        candidates = positions >= 0
        if self.observer_from is not None:
            candidates &= positions < self.observer_from[:, None, None]
        last = torch.where(candidates, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
        row_start = self.row_start.to(positions.device)[:, None, None]
        protected = candidates & ((positions - row_start < self.sinks) | (positions > last - self.window))
        captured = self.captured[layer_idx]
        ctx = LayerContext(
            layer_idx=layer_idx, num_layers=self.spec.num_layers, module=module, keys=keys, values=values,
            positions=positions, candidates=candidates, queries=query, query_positions=query_positions,
            new_slots=(layer.lengths - q).reshape(batch, heads), scale=scale,
            window_size=q if self.observer_from is not None else self.observers,
            hidden_states=captured.get("hidden_states"), pre_rope_queries=captured.get("pre_rope_queries"),
            pre_rope_keys=captured.get("pre_rope_keys"), pre_rope_values=captured.get("pre_rope_values"),
            replay=self.replay_chunk, state=state, prompt_end=self.prompt_end, protected=protected,
            budget_share=self.budget_share,
        )
        scores = self.scorer.score(ctx).float()
        if scores.shape != positions.shape:
            raise ValueError(f"scorer {self.scorer!r} returned shape {tuple(scores.shape)}, expected {tuple(positions.shape)}")
        scores = scores.masked_fill(~candidates, float("-inf"))
        # allocators observe the prompt's own window, not a replay (KVzip)
        if self.allocator.needs_window_attention and self.replay_chunk is None:
            self.allocator.observe_context(layer_idx, ctx)
        guide = self.scorer.take_guide()
        if self.allocator.needs_guide:
            guide = scores if guide is None else guide.float().masked_fill(~candidates, float("-inf"))
            self.allocator.observe_guide(layer_idx, guide)
        self.scores[layer_idx] = (scores, protected)
        names = [n for n in self.scorer.state_names if n in ctx.state]
        if names:
            layer.write_state({n: ctx.state[n] for n in names})
        captured.clear()
        if self.after_layer is not None:
            self.after_layer(layer_idx)

    def take_scores(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's stored ``(scores, protected)`` as two lists (per layer (B, H_kv, T)); clears them and
        stops scoring."""
        layers = range(self.spec.num_layers)
        scores = [self.scores[l][0] for l in layers]
        protected = [self.scores[l][1] for l in layers]
        self.scores.clear()
        self.scoring = False
        return scores, protected
