"""``compress(model, config | scorer, allocator, budget, ...)``: KV-cache compression around a model's own ``generate()``.

Inside the context manager every forward that starts a fresh cache gets a :class:`CompressedCache`; that first
(prefill) forward is scored layer by layer and the cache is physically compacted afterwards (``one_shot``), or
the prompt is run in chunks with an eviction after each (``chunked``: peak KV <= budget + chunk per head). Later
forwards append; with ``decode_budget`` they also evict to keep the cache at that size. Everything is undone on
exit: hooks removed, the model's attention implementation restored.

This module holds the session's hooks, prefill modes and evictions. The attention function and the per-layer
scoring are in :mod:`gatekv.attention`, the stats in :mod:`gatekv.stats`, the settings in :mod:`gatekv.settings`
(:class:`CompressionConfig`) and :class:`SharedPrefill` in :mod:`gatekv.shared_prefill`; they are re-exported here.

Typical use::

    with compress(model, "snapkv", "adakv", budget=0.1) as session:
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    print(session.stats.summary())

    config = CompressionConfig("snapkv", "adakv", budget=0.1)   # the same settings as one validated value
    with compress(model, config) as session: ...

Query-agnostic use (compress the context before the question is seen)::

    with compress(model, "snapkv", budget=0.1) as session:
        cache = session.new_cache()
        model(context_ids, cache=cache)                       # compressed here (past_key_values= before 5.2x)
        out = model.generate(torch.cat([context_ids, question_ids], 1), cache=cache)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from gatekv.allocators import AllocationInput, Allocator, Budget, get_allocator
from gatekv.attention import ATTENTION_NAME, ScorerGroup, SessionAttention, attach, detach
from gatekv.cache import CompressedCache, full_cache_kv_bytes
from gatekv.merge import MergeContext, Merger, get_merger
from gatekv.models import ModelSpec, cache_kwarg, capture_layer_inputs, find_cache, inspect_model
from gatekv.scorers import Scorer, get_scorer
from gatekv.settings import DEFAULT_RESERVE, DEFAULT_SINKS, DEFAULT_WINDOW, PREFILL_MODES, CompressionConfig
from gatekv.shared_prefill import SharedPrefill, _ScoreSet
from gatekv.stats import CompressionEvent, CompressionStats

__all__ = ["ATTENTION_NAME", "CompressionConfig", "CompressionEvent", "CompressionSession", "CompressionStats",
           "PREFILL_MODES", "SharedPrefill", "compress", "shared_prefill"]

_DEFAULTS = CompressionConfig()  # the signature defaults of compress() are the config's field defaults


def _auto_reserve(prompt_tokens: int) -> int:
    """Decode room per (row, KV head) when the generation length is unknown: 1/64 of the prompt (<= 2% of the full
    cache), at most ``DEFAULT_RESERVE`` slots; it regrows geometrically as tokens come."""
    return max(1, min(DEFAULT_RESERVE, prompt_tokens // 64))


def _reset(merger: Merger | None) -> None:
    """Forget what a stateful merger learned from the previous prompt."""
    if hasattr(merger, "reset"):  # gatekv.merge declares no reset() on its base: stateless mergers lack one
        merger.reset()


@dataclass
class _GenerateCall:
    """What compress() learns from a ``model.generate`` call: the prompt length and how many tokens will follow."""

    prompt_length: int | None
    max_new_tokens: int | None
    draft_tokens: int = 0
    """Draft tokens verified per step (assisted / prompt-lookup decoding): room for them too."""
    started: bool = False

    @property
    def room(self) -> int:
        """Slots the decode will append after the prefill (0 = unknown); the prefill forward yields the first token."""
        if not self.max_new_tokens:
            return 0
        return self.max_new_tokens - 1 + self.draft_tokens

    @classmethod
    def from_call(cls, model, args, kwargs) -> "_GenerateCall":
        inputs = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds")
                                            if kwargs.get(k) is not None), None)
        prompt = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if max_new is None and prompt is not None:
            max_length = kwargs.get("max_length", getattr(config, "max_length", None))
            max_new = None if max_length is None else max(int(max_length) - prompt, 0)
        drafts = 0
        if kwargs.get("assistant_model") is not None:
            drafts = kwargs.get("num_assistant_tokens", getattr(config, "num_assistant_tokens", 0)) or 0
        elif kwargs.get("prompt_lookup_num_tokens"):
            drafts = kwargs["prompt_lookup_num_tokens"]
        return cls(prompt, None if max_new is None else int(max_new), int(drafts))


class CompressionSession:
    """State of one ``compress()`` context. Use :func:`compress`; read ``stats`` and ``cache`` afterwards.

    model:  a supported causal LM
    config: the settings (:class:`CompressionConfig`, validated when it was made); ``settings`` instead build one,
            or replace fields of ``config``
    """

    def __init__(self, model: torch.nn.Module, config: CompressionConfig | None = None, **settings):
        if config is None:
            config = CompressionConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)
        self.config = config
        self.spec: ModelSpec = inspect_model(model)
        self.model = model
        self.scorer = get_scorer(config.scorer)
        _check_trained_scorers(model, self.scorer)
        self.allocator = get_allocator(config.allocator)
        self.merger = None if config.merge is None else get_merger(config.merge)
        self._attention = SessionAttention(self.spec, self.scorer, self.allocator, config.window, config.sinks,
                                           after_layer=self._after_layer, observe_window=config.observe_window)
        self._handles: list = []
        self._original_impl: str | None = None
        self._budget_rows: torch.Tensor | None = None
        self._decode_rows: torch.Tensor | None = None
        self._last_position: torch.Tensor | None = None
        self._query_rows: torch.Tensor | None = None
        self._phase = "prefill"
        self._held: dict | None = None  # hold_prefills(): the prefill is scored but not compacted
        self._busy = False  # inside a hook: the decoder forwards the session runs itself pass through untouched
        self._generate: _GenerateCall | None = None  # the model.generate() call in progress, if any
        self._draft_hidden: torch.Tensor | None = None  # assisted decoding: the prompt's last hidden state
        self._original_generate = None
        self._prompt_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # replaying scorers: (ids, positions)
        self._replay_columns = (0, 0)  # prompt columns of the forward just prefilled (what the replay reconstructs)

    # -- public ---------------------------------------------------------------------------------------------------
    @property
    def cache(self) -> CompressedCache | None:
        """The compressed cache of the current (or last) generation; None before the first prefill."""
        return self._attention.cache

    @cache.setter
    def cache(self, cache: CompressedCache | None) -> None:
        self._attention.cache = cache

    @property
    def stats(self) -> CompressionStats:
        """What the session did on the current (or last) prompt."""
        return self._attention.stats

    @stats.setter
    def stats(self, stats: CompressionStats) -> None:
        self._attention.stats = stats

    def new_cache(self) -> CompressedCache:
        """A fresh cache for this model; pass it as ``cache`` (``past_key_values`` in older transformers) (generate creates one automatically)."""
        reserve = DEFAULT_RESERVE if self.config.reserve is None else self.config.reserve
        self.cache = CompressedCache(self.spec.num_layers, reserve=reserve)
        return self.cache

    def expect_new_tokens(self, tokens: int | None) -> None:
        """Declare how many tokens will be generated after the next prefill (``model.generate`` does it itself from
        ``max_new_tokens``; a hand-written decode loop may): the cache then keeps room for exactly them."""
        self._generate = None if tokens is None else _GenerateCall(prompt_length=None, max_new_tokens=int(tokens))

    def hold_prefills(self, hold: bool = True) -> None:
        """``hold``: from the next prefill on, score it but keep its full cache (:attr:`held_cache`) instead of
        compacting it, so that :meth:`fork` can compact copies of it (a shared prefill); False: compact again."""
        self._held = {} if hold else None

    @property
    def held_cache(self) -> CompressedCache | None:
        """The full cache of the last prefill held by :meth:`hold_prefills`; None before one."""
        return None if self._held is None else self._held.get("cache")

    def fork(self, scores: list[torch.Tensor], allocator: Allocator, budget: Budget,
             merger: Merger | None = None) -> tuple[CompressedCache, CompressionStats]:
        """A compacted copy of :attr:`held_cache` and its stats (the prefill's, with this one eviction).

        scores:    per layer (B, H_kv, T) float32 scores of the held cache's slots (-inf: not a candidate); the
                   protected slots are the held prefill's
        allocator: an allocator that does not observe the prefill (``Allocator.observes_prefill`` false)
        budget:    tokens per KV head (ValueError naming rows whose budget is below sinks + window)
        merger:    merges the dropped tokens into kept ones, or None
        """
        held = self._held
        if not held or "cache" not in held:
            raise RuntimeError("fork() needs a held prefill first (hold_prefills(), then a prefill)")
        _reset(merger)
        base = held["stats"]
        lengths = base.prompt_tokens.to(held["cache"].layers[0].lengths.device)
        budget_rows = self._budget_tokens(budget, lengths)
        cache = copy.deepcopy(held["cache"])
        event = self._evict(cache, "prefill", scores, held["protected"], allocator, budget_rows, merger)
        stats = CompressionStats(prompt_tokens=base.prompt_tokens, budget_tokens=budget_rows.cpu(),
                                 full_kv_bytes=base.full_kv_bytes, events=[event], compact_seconds=event.seconds)
        return cache, stats

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def entered(self) -> Iterator["CompressionSession"]:
        """Hooks on, the attention routed to this session, for the block; everything undone on exit."""
        self._enter()
        try:
            yield self
        finally:
            self._exit()

    def _enter(self) -> None:
        attach(self._attention, self.spec.attention_modules)
        self._original_impl = self.model.config._attn_implementation
        # On the decoder, not the LM wrapper: ``model.model(ids, cache=...)`` (kvpress-style prefill) is compressed too.
        decoder = self.model.get_decoder()
        self._handles.append(decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(self._after_forward, with_kwargs=True))
        self._wrap_generate()
        hidden = "hidden_states" in self.scorer.needs
        pre_rope = "pre_rope" in self.scorer.needs
        if hidden or pre_rope:
            for layer in range(self.spec.num_layers):
                sink = self._attention.captured[layer]
                self._handles += capture_layer_inputs(self.spec, layer, sink, hidden, pre_rope, active=self._is_scoring)

    def _is_scoring(self) -> bool:
        """Whether the running forward is scored (the capture hooks copy the heads' inputs only then)."""
        return self._attention.scoring

    def _exit(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unwrap_generate()
        detach(self.spec.attention_modules)
        self._set_impl(self._original_impl)
        self._attention.scoring = False
        self._attention.scores.clear()
        if self.cache is not None:  # a later forward outside a session gets a clear error from the cache, not a shape one
            self.cache.pending_positions = None

    def _set_impl(self, name: str | None) -> None:
        if name is not None and self.model.config._attn_implementation != name:
            self.model.set_attn_implementation(name)

    def _wrap_generate(self) -> None:
        """Shadow ``model.generate`` on the instance (restored on exit) to learn the prompt length and
        ``max_new_tokens`` of each call: the decode room is sized from them (and assisted decoding's first forward,
        prompt + draft tokens, is split at the prompt)."""
        model = self.model
        self._original_generate = model.__dict__.get("generate")  # an instance attribute to restore, if any
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            previous = self._generate
            self._generate = _GenerateCall.from_call(model, args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self._generate = previous

        model.generate = generate

    def _unwrap_generate(self) -> None:
        if "generate" in self.model.__dict__:
            del self.model.generate
        if self._original_generate is not None:
            self.model.generate = self._original_generate
        self._original_generate = None

    # -- forward hooks --------------------------------------------------------------------------------------------
    def _before_forward(self, model, args, kwargs):
        if self._busy:  # a decoder forward the session itself runs (prefill chunks, observers, replays)
            return None
        self._busy = True
        try:
            return self._prepare_forward(model, args, kwargs)
        finally:
            self._busy = False

    def _after_forward(self, model, args, kwargs, output):
        if self._busy:
            return None
        self._busy = True
        try:
            return self._end_forward(kwargs, output)
        finally:
            self._busy = False

    def _prepare_forward(self, model, args, kwargs):
        if args:  # generate passes keywords; a positional input_ids is moved into kwargs
            kwargs = {**kwargs, "input_ids": args[0]}
            args = ()
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("gatekv.compress: forward called without input_ids or inputs_embeds")
        batch, q = tokens.shape[:2]
        cache = find_cache(kwargs)
        mask = self._check_mask(kwargs.get("attention_mask"), batch, q)
        if not isinstance(cache, CompressedCache):
            fresh = cache is None or cache.get_seq_length() == 0
            if not fresh or kwargs.get("use_cache") is False:
                self._set_impl(self._original_impl)  # not ours: plain forward
                return args, kwargs
            if q == 0:
                raise ValueError("gatekv.compress: empty prompt (0 tokens)")
            lengths = self._row_lengths(mask, batch, q, tokens.device)
            if self._is_noop(lengths):
                self.stats.noop = True
                self._set_impl(self._original_impl)
                return args, kwargs
            cache = self.new_cache()
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            kwargs[cache_kwarg(model)] = cache
            kwargs["use_cache"] = True
        self.cache = cache
        self._set_impl(ATTENTION_NAME)
        positions = kwargs.get("position_ids")
        if positions is None:
            if mask is not None:
                positions = (mask.long().cumsum(-1) - 1)[:, -q:].clamp(min=0)
            else:
                positions = torch.arange(q, device=tokens.device)[None] + cache.logical_length
            positions = positions.expand(batch, q)
            kwargs["position_ids"] = positions
        positions = positions.expand(batch, q).long()
        valid = mask[:, -q:].bool() if mask is not None else torch.ones(batch, q, dtype=torch.bool, device=tokens.device)
        token_positions = torch.where(valid, positions, torch.full_like(positions, -1))

        call = self._generate
        if cache.forwards == 0:  # the prefill: this forward's tokens are the prompt to compress
            if q == 0:
                raise ValueError("gatekv.compress: empty prompt (0 tokens)")
            if call is not None and not call.started and call.prompt_length is not None and q > call.prompt_length:
                # assisted / prompt-lookup decoding: the first forward holds the prompt and draft tokens; the
                # prompt alone is the prefill to compress, the drafts are decoded after it (and cropped if rejected)
                return self._split_drafts(model, kwargs, mask, positions, q - call.prompt_length)
            self._phase = "prefill"  # also during the leading chunks (cascading allocators read it)
            self._start_prompt(valid, token_positions, tokens)
            if self.config.reserve is None:
                cache.expect(0, reserve=_auto_reserve(int(valid.long().sum(-1).max())))
            if self.scorer.replays:
                if tokens.is_floating_point():
                    raise ValueError(f"scorer {self.scorer.name!r} replays the prompt's tokens: pass input_ids, not inputs_embeds")
                self._prompt_tokens = (tokens, token_positions)
            columns = (max(q - self.config.chunk_size, 0) if self.config.prefill == "chunked" else 0, q)  # the last forward's
            if self.config.prefill == "chunked" and q > self.config.chunk_size:
                kwargs = self._run_leading_chunks(cache, kwargs, mask, positions, token_positions)
                q = kwargs["input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"].shape[1]
                token_positions = token_positions[:, -q:]
            self._replay_columns = columns
            self._phase = "prefill"
            self._attention.scoring = self.config.query is None
        else:
            self._phase = "decode"
            self._attention.scoring = self._decode_rows is not None and cache.layers[0].max_length() + q > int(
                self._decode_rows.min()
            ) + self.config.decode_interval - 1
            if self._attention.scoring:  # the decode budget over the row's tokens so far, these included
                seen = token_positions.amax(-1) + 1 - self._attention.row_start.to(token_positions.device)
                self._attention.budget_share = (self._decode_rows.to(seen.device).double() / seen.clamp(min=1)).clamp(max=1.0)
            if call is not None and not call.started and call.room:  # a generate() continuing a prefilled cache
                cache.expect(q + call.room)
        if call is not None:
            call.started = True
        self._declare(cache, token_positions)
        return args, kwargs

    def _split_drafts(self, model, kwargs, mask, positions, drafts: int):
        """Run the prompt (all but the last ``drafts`` tokens) as its own forward through these hooks (the prefill,
        compressed), keep its last hidden state, and return the kwargs of a decode forward over the draft tokens;
        ``_end_forward`` puts the prompt's hidden state back in front (generate reads its logits)."""
        key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        head = dict(kwargs, position_ids=positions[:, :-drafts])
        head[key] = kwargs[key][:, :-drafts]
        if mask is not None:
            head["attention_mask"] = mask[:, : mask.shape[1] - drafts]
        self._busy = False
        try:
            prompt_output = model(**head)
        finally:
            self._busy = True
        tail = dict(kwargs, position_ids=positions[:, -drafts:])
        tail[key] = kwargs[key][:, -drafts:]
        args, tail = self._prepare_forward(model, (), tail)
        self._draft_hidden = prompt_output[0][:, -1:]
        return args, tail

    def _end_forward(self, kwargs, output):
        cache = find_cache(kwargs)
        if not isinstance(cache, CompressedCache):
            return output
        if self._phase == "prefill":
            call = self._generate
            if call is not None and call.room:  # the decode room, given at the compaction that follows
                room = call.room
                if self._decode_rows is not None:  # a fixed-size decode grows only up to decode_budget, then refills
                    growth = int((self._decode_rows - torch.minimum(self._budget_rows, self._decode_rows)).max())
                    room = min(room, growth + self.config.decode_interval)  # + the slots appended before an eviction
                cache.expect(room)
            self._finish_step(cache, "prefill")
            self._phase = "decode"
        elif self._attention.scoring:
            self._finish_step(cache, "decode")
        if self._draft_hidden is not None:
            output.last_hidden_state = torch.cat([self._draft_hidden, output.last_hidden_state], 1)
            self._draft_hidden = None
        return output

    # -- prompt handling --------------------------------------------------------------------------------------------
    @staticmethod
    def _check_mask(mask, batch: int, q: int):
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must be a 2-D (batch, length) padding mask, got {shape}")
        if mask.shape[0] != batch or mask.shape[1] < q:
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} does not match the input: expected ({batch}, >= {q})"
            )
        return mask

    @staticmethod
    def _row_lengths(mask, batch: int, q: int, device) -> torch.Tensor:
        if mask is None:
            return torch.full((batch,), q, dtype=torch.long, device=device)
        return mask[:, -q:].long().sum(-1)

    def _is_noop(self, lengths: torch.Tensor) -> bool:
        if self.config.decode_budget is not None or self.config.query is not None or self._held is not None:
            return False
        if not self.allocator.uses_budget:  # the threshold allocator keeps what its scores say, whatever the budget
            return False
        return bool((self.config.budget.tokens(lengths) >= lengths).all())

    def _budget_tokens(self, budget: Budget, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) tokens per head that ``budget`` gives rows of ``lengths`` tokens; ValueError naming rows whose budget
        is below the protected sinks + window."""
        budget_rows = budget.tokens(lengths)
        short = ((budget_rows < lengths) & (budget_rows < self.config.sinks + self.config.window)).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"budget {budget.value} gives {budget_rows[short].tolist()} tokens for row(s) {short}, fewer "
                f"than sinks + window = {self.config.sinks + self.config.window}"
            )
        return budget_rows

    def _start_prompt(self, valid: torch.Tensor, token_positions: torch.Tensor, tokens: torch.Tensor) -> None:
        lengths = valid.long().sum(-1)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"gatekv.compress: batch row(s) {empty} are all padding")
        right_padded = (valid.long().cummax(-1).values.bool() & ~valid).any(-1).nonzero().flatten().tolist()
        if right_padded:
            raise ValueError(f"gatekv.compress: batch row(s) {right_padded} have padding after their tokens; use left "
                             "padding (tokenizer.padding_side = 'left')")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = int(token_positions.max()) + 1
        if isinstance(limit, int) and longest > limit:
            warnings.warn(f"gatekv.compress: the prompt reaches position {longest}, past the model's "
                          f"max_position_embeddings {limit}: outputs past that length are unreliable", stacklevel=2)
        budget_rows = self._budget_tokens(self.config.budget, lengths)
        self._budget_rows = budget_rows
        _reset(self.merger)
        if self.config.decode_budget is None:
            self._decode_rows = None
        elif self.config.decode_budget.is_ratio:
            self._decode_rows = self.config.decode_budget.tokens(lengths)
        else:
            self._decode_rows = torch.full_like(lengths, int(self.config.decode_budget.value))
        self._last_position = torch.full_like(lengths, -1)
        big = torch.iinfo(torch.long).max
        self._attention.row_start = torch.where(token_positions >= 0, token_positions, torch.full_like(token_positions, big)).min(-1).values
        self._attention.prompt_end = token_positions.amax(-1)
        # a held (shared) prefill is forked at several budgets later: its scorers are not told one
        self._attention.budget_share = None if self._held is not None else (
            budget_rows.double() / lengths.clamp(min=1)).clamp(max=1.0)
        dtype = tokens.dtype if tokens.is_floating_point() else self.model.get_input_embeddings().weight.dtype
        self.stats = CompressionStats(
            prompt_tokens=lengths.cpu(),
            budget_tokens=budget_rows.cpu(),
            full_kv_bytes=full_cache_kv_bytes(self.model.config, valid.shape[0], valid.shape[1], dtype),
        )
        if self.config.query is not None:
            query = self.config.query if self.config.query.dim() == 2 else self.config.query[None].expand(valid.shape[0], -1)
            if query.shape[0] != valid.shape[0]:
                raise ValueError(f"query has {query.shape[0]} rows but the batch has {valid.shape[0]}")
            self._query_rows = query.to(valid.device)

    def _run_leading_chunks(self, cache, kwargs, mask, positions, token_positions):
        """Run every chunk but the last through the decoder, evicting after each; return kwargs for the last."""
        key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        tokens = kwargs[key]
        q = tokens.shape[1]
        past = 0 if mask is None else mask.shape[1] - q
        # Chunks are aligned to the end of the prompt: rows are left-padded, so every row then sees the same
        # chunk boundaries relative to its own tokens as it would alone (batch rows stay independent).
        last_start = q - self.config.chunk_size
        boundaries = list(range(last_start, 0, -self.config.chunk_size))[::-1]
        decoder = self.model.get_decoder()
        for start, end in zip([0] + boundaries[:-1], boundaries):
            self._declare(cache, token_positions[:, start:end])
            self._replay_columns = (start, end)
            self._attention.scoring = self.config.query is None
            decoder(
                **{key: tokens[:, start:end]},
                attention_mask=None if mask is None else mask[:, : past + end],
                position_ids=positions[:, start:end],
                use_cache=True,
                **{cache_kwarg(decoder): cache},
            )
            self._finish_step(cache, "chunk")
        kwargs = dict(kwargs)
        kwargs[key] = tokens[:, last_start:]
        kwargs["position_ids"] = positions[:, last_start:]
        return kwargs

    def _declare(self, cache: CompressedCache, token_positions: torch.Tensor) -> None:
        """Tell the cache the next forward's token positions (B, q) and track each row's last position."""
        cache.begin_forward(token_positions)
        if self._last_position is not None:
            self._last_position = torch.maximum(self._last_position, token_positions.amax(-1).to(self._last_position.device))

    def _finish_step(self, cache: CompressedCache, kind: str) -> None:
        """After a forward: observe the query (query-aware), then allocate and compact every layer."""
        if kind != "decode" and self.config.query is not None:
            self._observe_query(cache)
        elif kind != "decode" and self.scorer.replays:
            self._replay(cache)
        if not self._attention.scores:
            self._attention.scoring = False
            return
        scores, protected = self._attention.take_scores()
        if kind == "prefill" and self._held is not None:  # shared prefill: keep the full cache, fork copies later
            self._held.update(cache=cache, protected=protected, stats=self.stats)
            return
        budget = self._decode_rows if kind == "decode" else self._budget_rows
        event = self._evict(cache, kind, scores, protected, self.allocator, budget, self.merger)
        self.stats.compact_seconds += event.seconds
        self.stats.events.append(event)

    def _evict(self, cache, kind, scores, protected, allocator, budget, merger) -> CompressionEvent:
        """Allocate ``budget`` (B,) tokens per head over every layer's ``scores``/``protected`` (B, H_kv, T) and compact
        ``cache`` in place (merging dropped tokens with ``merger``)."""
        start = time.perf_counter()
        layers = range(self.spec.num_layers)
        inputs = AllocationInput(scores=scores, protected=protected, budget=budget.to(scores[0].device), window=self.config.window)
        plan = allocator.allocate(inputs)
        before = cache.kv_bytes()
        reserve = self.config.reserve
        if reserve is None and kind == "chunk":  # room for exactly the next chunk: peak KV = budget + one chunk
            reserve = self.config.chunk_size
        for l in layers:
            merge = None
            if merger is not None:
                merge = _merge_spec(merger, cache, l, scores[l], protected[l], plan.indices[l], plan.counts[l])
            if kind == "decode" and merge is None:  # fixed-size decode: the new tokens take the evicted slots, O(d)
                cache.layers[l].evict_in_place(plan.indices[l], plan.counts[l])
            else:
                cache.layers[l].compact(plan.indices[l], plan.counts[l], reserve, merge)  # None: the cache's room
        cache.compressions += 1
        seconds = time.perf_counter() - start
        kept_positions = None
        if self.config.record:
            kept_positions = [cache.layers[l].dense_view()[2].cpu() for l in layers]
        return CompressionEvent(kind, cache.kept_tokens(), before, cache.kv_bytes(), seconds, self._last_position.cpu(),
                                kept_positions)

    def _observe_query(self, cache: CompressedCache) -> None:
        """Query-aware scoring: run the query tokens as observers (their KV is dropped by the compaction)."""
        last = self._last_position  # (B,)
        q = self._query_rows.shape[1]
        obs_positions = last[:, None] + 1 + torch.arange(q, device=last.device)[None]
        self._attention.observer_from = last + 1
        cache.begin_forward(obs_positions, advance=False)
        self._attention.scoring = True
        try:
            decoder = self.model.get_decoder()
            decoder(input_ids=self._query_rows, position_ids=obs_positions, use_cache=True, **{cache_kwarg(decoder): cache})
        finally:
            self._attention.observer_from = None

    def _replay(self, cache: CompressedCache) -> None:
        """Replaying scorers (KVzip): run the scorer's replay forwards for the prompt columns just prefilled, each
        scored like query observers; after each, its KV is dropped (the cache and the stored scores are as after the
        prompt again), so the last one's scores decide the eviction."""
        start_time = time.perf_counter()
        ids, token_positions = self._prompt_tokens
        start, end = self._replay_columns
        decoder = self.model.get_decoder()
        for chunk in self.scorer.replay_inputs(ids, token_positions, start, end):
            base = [(layer.lengths.clone(), layer.max_length()) for layer in cache.layers]
            last = self._last_position.to(chunk.valid.device)
            positions = torch.where(chunk.valid, last[:, None] + chunk.valid.long().cumsum(-1),
                                    torch.full_like(chunk.input_ids, -1))
            self._attention.observer_from = last + 1
            self._attention.replay_chunk = chunk
            cache.begin_forward(positions, advance=False)
            self._attention.scoring = True
            try:
                decoder(input_ids=chunk.input_ids, position_ids=positions.clamp(min=0), use_cache=True,
                        **{cache_kwarg(decoder): cache})
            finally:
                self._attention.observer_from = None
                self._attention.replay_chunk = None
            for l, (layer, (lengths, width)) in enumerate(zip(cache.layers, base)):
                counts = lengths.reshape(layer.batch_size, layer.num_heads)
                keep = torch.arange(width, device=lengths.device).expand(layer.batch_size, layer.num_heads, width)
                layer.compact(keep, counts, 0)
                if l in self._attention.scores:
                    scores, protected = self._attention.scores[l]
                    self._attention.scores[l] = (scores[..., :width], protected[..., :width])
                if isinstance(self.scorer, ScorerGroup):
                    self.scorer.trim(l, width)
        self.stats.replay_seconds += time.perf_counter() - start_time

    # -- cascade ----------------------------------------------------------------------------------------------------
    def _after_layer(self, layer_idx: int) -> None:
        """After layer ``layer_idx`` is scored: the cascade step of a cascading allocator, during the prompt's own
        forwards only (not while query observers run: the prompt forward already filled every layer, there is no
        peak to cut; not for replaying scorers: their scores exist only after the replay, allocated once)."""
        if (self.allocator.cascade and self._phase == "prefill" and self._attention.observer_from is None
                and not self.scorer.replays):
            self._cascade(layer_idx)

    def _cascade(self, layer_idx: int) -> None:
        """Cascading allocators (CAKE): once layer m is scored (its attention already computed), re-allocate the
        budget over layers 0..m and re-evict them with their stored scores, so the prefill never holds more than the
        budget plus one uncompressed layer. Stored scores are gathered along, to stay aligned with the slots."""
        cache = self.cache
        layers = range(layer_idx + 1)
        inputs = AllocationInput(
            scores=[self._attention.scores[l][0] for l in layers],
            protected=[self._attention.scores[l][1] for l in layers],
            budget=self._budget_rows.to(self._attention.scores[layer_idx][0].device),
            window=self.config.window,
        )
        held = torch.zeros_like(self._budget_rows)  # tokens per head still held by the later layers (chunked)
        for later in cache.layers[layer_idx + 1 :]:
            if later.is_initialized and later.lengths.numel():
                held += later.lengths.reshape(later.batch_size, later.num_heads).amax(-1).to(held.device)
        plan = self.allocator.cascade_allocate(inputs, self.spec.num_layers, held)
        self.stats.cascade_peak_kv_bytes = max(self.stats.cascade_peak_kv_bytes, cache.kv_bytes())
        for l in layers:
            cache.layers[l].compact(plan.indices[l], plan.counts[l], 0)
            scores, protected = self._attention.scores[l]
            self._attention.scores[l] = (
                _gather_slots(scores, plan.indices[l], plan.counts[l], float("-inf")),
                _gather_slots(protected, plan.indices[l], plan.counts[l], False),
            )



def _merge_spec(merger: Merger, cache: CompressedCache, layer_idx: int, scores, protected, indices, counts):
    """The merger's (sources, targets, weights, counts) for one layer's eviction, or None."""
    keys, values, positions, _ = cache.layers[layer_idx].dense_view()
    spec = merger.merge(MergeContext(layer_idx, keys, values, positions, scores, protected, indices, counts))
    return None if spec is None else spec.as_tuple()


def _gather_slots(dense: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, fill) -> torch.Tensor:
    """Per-slot values (B, H, T) of the slots a plan keeps: (B, H, K_max), ``fill`` past ``counts``."""
    if indices.shape[-1] == 0:
        return dense[..., :0]
    kept = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    gathered = torch.gather(dense, 2, indices.to(dense.device))
    return torch.where(kept.to(dense.device), gathered, torch.full_like(gathered, fill))


@contextlib.contextmanager
def compress(
    model: torch.nn.Module,
    scorer: str | Scorer | CompressionConfig = _DEFAULTS.scorer,
    allocator: str | Allocator = _DEFAULTS.allocator,
    budget: float | int | Budget = _DEFAULTS.budget.value,
    prefill: str = _DEFAULTS.prefill,
    chunk_size: int = _DEFAULTS.chunk_size,
    window: int = _DEFAULTS.window,
    sinks: int = _DEFAULTS.sinks,
    decode_budget: float | int | None = _DEFAULTS.decode_budget,
    query: torch.Tensor | None = _DEFAULTS.query,
    reserve: int | None = _DEFAULTS.reserve,
    record: bool = _DEFAULTS.record,
    merge: str | Merger | None = _DEFAULTS.merge,
    *,
    decode_interval: int = _DEFAULTS.decode_interval,
    observe_window: int | None = _DEFAULTS.observe_window,
    config: CompressionConfig | None = None,
) -> Iterator[CompressionSession]:
    """Compress the KV cache of every generation/forward run inside the block.

    model:   a supported causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3 families)
    config:  the settings as one :class:`CompressionConfig` (also accepted in place of ``scorer``); then the other
             settings must stay at their defaults (``config.replace(budget=...)`` changes a field)
    scorer, allocator, budget, prefill, chunk_size, window, sinks, decode_budget, query, reserve, record, merge,
    decode_interval, observe_window: the fields of :class:`CompressionConfig` (see its field docstrings), checked once
    here
    """
    if isinstance(scorer, CompressionConfig):
        if config is not None:
            raise ValueError("compress(): config given twice (in place of scorer and as config=)")
        config, scorer = scorer, _DEFAULTS.scorer
    settings = dict(scorer=scorer, allocator=allocator, budget=budget, prefill=prefill, chunk_size=chunk_size,
                    window=window, sinks=sinks, decode_budget=decode_budget, query=query, reserve=reserve,
                    record=record, merge=merge, decode_interval=decode_interval, observe_window=observe_window)
    if config is None:
        config = CompressionConfig(**settings)
    else:
        changed = sorted(k for k, v in settings.items() if not _is_default(k, v))
        if changed:
            raise ValueError(f"compress(): {changed} given together with config; use config.replace(...) instead")
    session = CompressionSession(model, config)
    with session.entered():
        yield session


def _is_default(name: str, value) -> bool:
    default = getattr(_DEFAULTS, name)
    if name == "budget":
        default = default.value
    return value is default or (not isinstance(value, torch.Tensor) and type(value) is type(default) and value == default)


@contextlib.contextmanager
def shared_prefill(
    model: torch.nn.Module,
    scorers: dict[str, str | Scorer],
    window: int = DEFAULT_WINDOW,
    sinks: int = DEFAULT_SINKS,
    reserve: int | None = None,
    record: bool = False,
    observe_window: int | None = None,
) -> Iterator[SharedPrefill]:
    """Evaluate many (scorer, allocator, budget) settings on one prompt with a single prefill (one-shot mode)::

        with shared_prefill(model, {"snapkv": "snapkv", "heads": adapter_heads}) as shared:
            shared.prefill(context_ids)                       # query-agnostic: the context alone
            for name, allocator, budget in settings:
                cache, stats = shared.fork(name, allocator, budget)
                out = model.generate(torch.cat([context_ids, question_ids], 1), cache=cache)

    scorers: label -> scorer name or instance (scored together on the same forward; their ``needs`` are merged)
    window, sinks, reserve, record, observe_window: as in :func:`compress`
    """
    if not scorers:
        raise ValueError("scorers must not be empty")
    score_set = _ScoreSet({name: get_scorer(s) for name, s in scorers.items()})
    config = CompressionConfig(score_set, "uniform", 1.0, "one_shot", window=window, sinks=sinks, reserve=reserve,
                               record=record, observe_window=observe_window)
    session = CompressionSession(model, config)
    session.hold_prefills()
    with session.entered():
        try:
            yield SharedPrefill(session, score_set)
        finally:
            session.hold_prefills(False)


def _check_trained_scorers(model, scorer: Scorer) -> None:
    """``ValueError`` if trained heads (a scorer with a ``config.fingerprint``) were made for a model of another
    fingerprint than ``model``; ``Adapter.heads_for(model, allow_mismatch=True)`` is the explicit override."""
    from gatekv.heads.config import ModelFingerprint

    if isinstance(scorer, ScorerGroup):  # a shared prefill's set, a rank mix (possibly inside the set)
        for member in scorer.members.values():
            _check_trained_scorers(model, member)
        return
    fingerprint = getattr(getattr(scorer, "config", None), "fingerprint", None)
    if not isinstance(fingerprint, ModelFingerprint):
        return
    model_print = ModelFingerprint.from_model(model)
    if getattr(scorer, "accepted_fingerprint", None) != model_print:
        fingerprint.check_matches(model_print, what=f"scorer ({type(scorer).__name__} heads)")
