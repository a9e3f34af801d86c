"""``compress(model, scorer, allocator, budget, ...)``: KV-cache compression around a model's own ``generate()``.

Inside the context manager every forward that starts a fresh cache gets a :class:`CompressedCache`; that first
(prefill) forward is scored layer by layer and the cache is physically compacted afterwards (``one_shot``), or
the prompt is run in chunks with an eviction after each (``chunked``: peak KV <= budget + chunk per head). Later
forwards append; with ``decode_budget`` they also evict to keep the cache at that size. Everything is undone on
exit: hooks removed, the model's attention implementation restored.

Typical use::

    with compress(model, "snapkv", "adakv", budget=0.1) as session:
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    print(session.stats.summary())

Query-agnostic use (compress the context before the question is seen)::

    with compress(model, "snapkv", budget=0.1) as session:
        cache = session.new_cache()
        model(context_ids, cache=cache)                       # compressed here (past_key_values= before 5.2x)
        out = model.generate(torch.cat([context_ids, question_ids], 1), cache=cache)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from gatekv import kernels
from gatekv.allocators import AllocationInput, Allocator, Budget, get_allocator
from gatekv.cache import CompressedCache, full_cache_kv_bytes
from gatekv.merge import MergeContext, Merger, get_merger
from gatekv.models import ModelSpec, cache_kwarg, capture_layer_inputs, find_cache, inspect_model
from gatekv.scorers import LayerContext, Scorer, get_scorer

__all__ = ["ATTENTION_NAME", "CompressionEvent", "CompressionSession", "CompressionStats", "SharedPrefill", "compress",
           "shared_prefill"]

ATTENTION_NAME = "gatekv_ragged"
PREFILL_MODES = ("one_shot", "chunked")
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, CompressionSession]" = weakref.WeakKeyDictionary()


def _ragged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered with transformers' AttentionInterface under ``ATTENTION_NAME``.

    query: (B, H_q, q, d) post-RoPE. key/value: (B, H_kv, q, d) the new tokens, as ``CompressedCache.update``
    returned them; the session attends over the layer's ragged cache (which holds exactly them after the first
    forward into an empty cache). Returns ``((B, q, H_q, d_v), None)``.
    """
    session = _SESSIONS.get(module)
    if session is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} is only usable inside gatekv.compress()")
    scale = scaling if scaling is not None else module.head_dim**-0.5
    output = session._attend(module, query, key, value, scale, kwargs.get("sliding_window"))
    return output.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _ragged_attention_forward)


_DEFAULT_RESERVE = 64


def _auto_reserve(prompt_tokens: int) -> int:
    """Decode room per (row, KV head) when the generation length is unknown: 1/64 of the prompt (<= 2% of the full
    cache), at most 64 slots; it regrows geometrically as tokens come."""
    return max(1, min(_DEFAULT_RESERVE, prompt_tokens // 64))


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


@dataclass
class CompressionEvent:
    """One eviction: after a prefill (``prefill``), a prefill chunk (``chunk``) or a decode step (``decode``)."""

    kind: str
    kept_tokens: torch.Tensor
    """(num_layers, B, H_kv) tokens held after the eviction."""
    kv_bytes_before: int
    kv_bytes_after: int
    seconds: float
    """Allocation + compaction time."""
    last_position: torch.Tensor
    """(B,) position of the last token processed before the eviction."""
    kept_positions: list[torch.Tensor] | None = None
    """Per layer (B, H_kv, K) positions of the kept tokens (-1 padding); only with ``record=True``."""


@dataclass
class CompressionStats:
    """What a session did: prompt and budget sizes, every eviction, time spent, bytes held."""

    prompt_tokens: torch.Tensor | None = None
    """(B,) non-padding tokens of the compressed prompt."""
    budget_tokens: torch.Tensor | None = None
    """(B,) tokens per KV head the allocator targeted."""
    full_kv_bytes: int = 0
    """Bytes an uncompressed cache would hold for the prompt (same dtype)."""
    events: list[CompressionEvent] = field(default_factory=list)
    score_seconds: float = 0.0
    compact_seconds: float = 0.0
    noop: bool = False
    """True when the budget covered the whole prompt and nothing was changed."""
    cascade_peak_kv_bytes: int = 0
    """Largest KV allocation seen inside a prefill forward, before each layer's cascade re-eviction (CAKE)."""
    replay_seconds: float = 0.0
    """Time of a replaying scorer's extra forwards (KVzip's context reconstruction), their scoring included."""

    @property
    def peak_kv_bytes(self) -> int:
        """Largest KV allocation seen right before an eviction (the prefill peak, cascade steps included)."""
        return max(max((e.kv_bytes_before for e in self.events), default=0), self.cascade_peak_kv_bytes)

    @property
    def kept_tokens(self) -> torch.Tensor | None:
        """(num_layers, B, H_kv) tokens held after the last eviction."""
        return self.events[-1].kept_tokens if self.events else None

    def summary(self) -> str:
        if self.noop:
            return "budget covers the prompt: no compression"
        if not self.events:
            return "nothing compressed yet"
        last = self.events[-1]
        kept = last.kept_tokens.double()
        return (
            f"prompt {self.prompt_tokens.tolist()} tokens, budget {self.budget_tokens.tolist()} per head; "
            f"kept per head mean {kept.mean():.1f} (min {int(kept.min())}, max {int(kept.max())}); "
            f"KV {last.kv_bytes_after / 2**20:.2f} MiB vs full {self.full_kv_bytes / 2**20:.2f} MiB "
            f"({last.kv_bytes_after / max(self.full_kv_bytes, 1):.3f}x); "
            f"score {self.score_seconds:.3f}s, compact {self.compact_seconds:.3f}s, {len(self.events)} evictions"
        )


def _resolve_budget(value, field_name: str) -> Budget:
    try:
        return value if isinstance(value, Budget) else Budget(value)
    except ValueError as error:
        raise ValueError(f"{field_name}: {error}") from None


class CompressionSession:
    """State of one ``compress()`` context. Use :func:`compress`; read ``stats`` and ``cache`` afterwards."""

    def __init__(
        self,
        model: torch.nn.Module,
        scorer: str | Scorer = "snapkv",
        allocator: str | Allocator = "uniform",
        budget: float | int | Budget = 0.1,
        prefill: str = "one_shot",
        chunk_size: int = 512,
        window: int = 32,
        sinks: int = 4,
        decode_budget: float | int | None = None,
        query: torch.Tensor | None = None,
        reserve: int | None = None,
        record: bool = False,
        merge: str | Merger | None = None,
    ):
        self.spec: ModelSpec = inspect_model(model)
        self.model = model
        self.scorer = get_scorer(scorer)
        _check_trained_scorers(model, self.scorer)
        self.allocator = get_allocator(allocator)
        self.merger = None if merge is None else get_merger(merge)
        self.budget = _resolve_budget(budget, "budget")
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {list(PREFILL_MODES)}, got {prefill!r}")
        for name, value, low in (("chunk_size", chunk_size, 1), ("window", window, 0), ("sinks", sinks, 0), ("reserve", reserve, 0)):
            if name == "reserve" and value is None:
                continue  # sized from generate's max_new_tokens, or small and growing
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not self.budget.is_ratio and self.budget.value < sinks + window:
            raise ValueError(
                f"budget {self.budget.value} tokens is smaller than sinks + window = {sinks} + {window}: "
                "the protected tokens alone exceed it"
            )
        self.decode_budget = None if decode_budget is None else _resolve_budget(decode_budget, "decode_budget")
        if self.decode_budget is not None and not self.decode_budget.is_ratio and self.decode_budget.value < sinks + window:
            raise ValueError(f"decode_budget {self.decode_budget.value} is smaller than sinks + window = {sinks + window}")
        if query is not None:
            query = torch.as_tensor(query)
            if query.dtype not in (torch.int32, torch.int64) or query.dim() not in (1, 2) or query.shape[-1] == 0:
                raise ValueError(f"query must be token ids of shape (q,) or (B, q) with q >= 1, got {tuple(query.shape)} {query.dtype}")
        if query is not None and self.scorer.replays:
            raise ValueError(f"scorer {self.scorer.name!r} replays the context (query-agnostic): query= is not supported")
        self.query = query
        self.prefill, self.chunk_size, self.window, self.sinks = prefill, chunk_size, window, sinks
        self.reserve, self.record = reserve, record
        self.stats = CompressionStats()
        self.cache: CompressedCache | None = None
        self._handles: list = []
        self._captured: list[dict] = [{} for _ in range(self.spec.num_layers)]
        self._original_impl: str | None = None
        self._scoring = False
        self._observer_from: torch.Tensor | None = None
        self._scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._budget_rows: torch.Tensor | None = None
        self._decode_rows: torch.Tensor | None = None
        self._row_start: torch.Tensor | None = None
        self._last_position: torch.Tensor | None = None
        self._query_rows: torch.Tensor | None = None
        self._phase = "prefill"
        self._held: dict | None = None  # set by SharedPrefill: the prefill is scored but not compacted
        self._busy = False  # inside a hook: the decoder forwards the session runs itself pass through untouched
        self._generate: _GenerateCall | None = None  # the model.generate() call in progress, if any
        self._draft_hidden: torch.Tensor | None = None  # assisted decoding: the prompt's last hidden state
        self._original_generate = None
        self._prompt_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # replaying scorers: (ids, positions)
        self._replay_columns = (0, 0)  # prompt columns of the forward just prefilled (what the replay reconstructs)
        self._replay_chunk = None  # the ReplayChunk being scored

    # -- public ---------------------------------------------------------------------------------------------------
    def new_cache(self) -> CompressedCache:
        """A fresh cache for this model; pass it as ``cache`` (``past_key_values`` in older transformers) (generate creates one automatically)."""
        self.cache = CompressedCache(self.spec.num_layers, reserve=_DEFAULT_RESERVE if self.reserve is None else self.reserve)
        return self.cache

    def expect_new_tokens(self, tokens: int | None) -> None:
        """Declare how many tokens will be generated after the next prefill (``model.generate`` does it itself from
        ``max_new_tokens``; a hand-written decode loop may): the cache then keeps room for exactly them."""
        self._generate = None if tokens is None else _GenerateCall(prompt_length=None, max_new_tokens=int(tokens))

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def _enter(self) -> None:
        for module in self.spec.attention_modules:
            if module in _SESSIONS:
                raise RuntimeError("this model is already inside a gatekv.compress() context")
        _register_attention()
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
                self._handles += capture_layer_inputs(self.spec, layer, self._captured[layer], hidden, pre_rope)
        for module in self.spec.attention_modules:
            _SESSIONS[module] = self

    def _exit(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unwrap_generate()
        for module in self.spec.attention_modules:
            _SESSIONS.pop(module, None)
        self._set_impl(self._original_impl)
        self._scoring = False
        self._scores.clear()
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
            if self.reserve is None:
                cache.expect(0, reserve=_auto_reserve(int(valid.long().sum(-1).max())))
            if self.scorer.replays:
                if tokens.is_floating_point():
                    raise ValueError(f"scorer {self.scorer.name!r} replays the prompt's tokens: pass input_ids, not inputs_embeds")
                self._prompt_tokens = (tokens, token_positions)
            columns = (max(q - self.chunk_size, 0) if self.prefill == "chunked" else 0, q)  # the last forward's
            if self.prefill == "chunked" and q > self.chunk_size:
                kwargs = self._run_leading_chunks(cache, kwargs, mask, positions, token_positions)
                q = kwargs["input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"].shape[1]
                token_positions = token_positions[:, -q:]
            self._replay_columns = columns
            self._phase = "prefill"
            self._scoring = self.query is None
        else:
            self._phase = "decode"
            self._scoring = self._decode_rows is not None and cache.layers[0].max_length() + q > int(
                self._decode_rows.min()
            )
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
                room = call.room if self._decode_rows is None else min(call.room, int(self._decode_rows.max()))
                cache.expect(room)
            self._finish_step(cache, "prefill")
            self._phase = "decode"
        elif self._scoring:
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
        if self.decode_budget is not None or self.query is not None or self._held is not None:
            return False
        return bool((self.budget.tokens(lengths) >= lengths).all())

    def _budget_tokens(self, budget: Budget, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) tokens per head that ``budget`` gives rows of ``lengths`` tokens; ValueError naming rows whose budget
        is below the protected sinks + window."""
        budget_rows = budget.tokens(lengths)
        short = ((budget_rows < lengths) & (budget_rows < self.sinks + self.window)).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"budget {budget.value} gives {budget_rows[short].tolist()} tokens for row(s) {short}, fewer "
                f"than sinks + window = {self.sinks + self.window}"
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
        budget_rows = self._budget_tokens(self.budget, lengths)
        self._budget_rows = budget_rows
        if hasattr(self.merger, "reset"):
            self.merger.reset()
        if self.decode_budget is None:
            self._decode_rows = None
        elif self.decode_budget.is_ratio:
            self._decode_rows = self.decode_budget.tokens(lengths)
        else:
            self._decode_rows = torch.full_like(lengths, int(self.decode_budget.value))
        self._last_position = torch.full_like(lengths, -1)
        big = torch.iinfo(torch.long).max
        self._row_start = torch.where(token_positions >= 0, token_positions, torch.full_like(token_positions, big)).min(-1).values
        dtype = tokens.dtype if tokens.is_floating_point() else self.model.get_input_embeddings().weight.dtype
        self.stats = CompressionStats(
            prompt_tokens=lengths.cpu(),
            budget_tokens=budget_rows.cpu(),
            full_kv_bytes=full_cache_kv_bytes(self.model.config, valid.shape[0], valid.shape[1], dtype),
        )
        if self.query is not None:
            query = self.query if self.query.dim() == 2 else self.query[None].expand(valid.shape[0], -1)
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
        last_start = q - self.chunk_size
        boundaries = list(range(last_start, 0, -self.chunk_size))[::-1]
        decoder = self.model.get_decoder()
        for start, end in zip([0] + boundaries[:-1], boundaries):
            self._declare(cache, token_positions[:, start:end])
            self._replay_columns = (start, end)
            self._scoring = self.query is None
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
        if kind != "decode" and self.query is not None:
            self._observe_query(cache)
        elif kind != "decode" and self.scorer.replays:
            self._replay(cache)
        if not self._scores:
            self._scoring = False
            return
        if kind == "prefill" and self._held is not None:  # shared prefill: keep the full cache, fork copies later
            self._held.update(cache=cache, protected=[self._scores[l][1] for l in range(self.spec.num_layers)])
            self._scores.clear()
            self._scoring = False
            return
        budget = self._decode_rows if kind == "decode" else self._budget_rows
        scores = [self._scores[l][0] for l in range(self.spec.num_layers)]
        protected = [self._scores[l][1] for l in range(self.spec.num_layers)]
        event = self._evict(cache, kind, scores, protected, self.allocator, budget, self.merger)
        self.stats.compact_seconds += event.seconds
        self.stats.events.append(event)
        self._scores.clear()
        self._scoring = False

    def _evict(self, cache, kind, scores, protected, allocator, budget, merger) -> CompressionEvent:
        """Allocate ``budget`` (B,) tokens per head over every layer's ``scores``/``protected`` (B, H_kv, T) and compact
        ``cache`` in place (merging dropped tokens with ``merger``)."""
        start = time.perf_counter()
        layers = range(self.spec.num_layers)
        inputs = AllocationInput(scores=scores, protected=protected, budget=budget.to(scores[0].device), window=self.window)
        plan = allocator.allocate(inputs)
        before = cache.kv_bytes()
        for l in layers:
            merge = None
            if merger is not None:
                merge = _merge_spec(merger, cache, l, scores[l], protected[l], plan.indices[l], plan.counts[l])
            if kind == "decode" and merge is None:  # fixed-size decode: the new tokens take the evicted slots, O(d)
                cache.layers[l].evict_in_place(plan.indices[l], plan.counts[l])
            else:
                cache.layers[l].compact(plan.indices[l], plan.counts[l], self.reserve, merge)  # None: the cache's room
        cache.compressions += 1
        seconds = time.perf_counter() - start
        kept_positions = None
        if self.record:
            kept_positions = [cache.layers[l].dense_view()[2].cpu() for l in layers]
        return CompressionEvent(kind, cache.kept_tokens(), before, cache.kv_bytes(), seconds, self._last_position.cpu(),
                                kept_positions)

    def _observe_query(self, cache: CompressedCache) -> None:
        """Query-aware scoring: run the query tokens as observers (their KV is dropped by the compaction)."""
        last = self._last_position  # (B,)
        q = self._query_rows.shape[1]
        obs_positions = last[:, None] + 1 + torch.arange(q, device=last.device)[None]
        self._observer_from = last + 1
        cache.begin_forward(obs_positions, advance=False)
        self._scoring = True
        try:
            decoder = self.model.get_decoder()
            decoder(input_ids=self._query_rows, position_ids=obs_positions, use_cache=True, **{cache_kwarg(decoder): cache})
        finally:
            self._observer_from = None

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
            self._observer_from = last + 1
            self._replay_chunk = chunk
            cache.begin_forward(positions, advance=False)
            self._scoring = True
            try:
                decoder(input_ids=chunk.input_ids, position_ids=positions.clamp(min=0), use_cache=True,
                        **{cache_kwarg(decoder): cache})
            finally:
                self._observer_from = None
                self._replay_chunk = None
            for l, (layer, (lengths, width)) in enumerate(zip(cache.layers, base)):
                counts = lengths.reshape(layer.batch_size, layer.num_heads)
                keep = torch.arange(width, device=lengths.device).expand(layer.batch_size, layer.num_heads, width)
                layer.compact(keep, counts, 0)
                if l in self._scores:
                    scores, protected = self._scores[l]
                    self._scores[l] = (scores[..., :width], protected[..., :width])
                if isinstance(self.scorer, _ScoreSet):
                    self.scorer.trim(l, width)
        self.stats.replay_seconds += time.perf_counter() - start_time

    # -- attention and scoring ------------------------------------------------------------------------------------
    def _attend(self, module, query: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, scale: float,
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
            )
        if self._scoring:
            start = time.perf_counter()
            dense = None
            if fresh:  # what dense_view() would copy out of the flat buffers, already at hand
                positions = query_positions[:, None, :].expand(layer.batch_size, layer.num_heads, q)
                dense = (new_keys, new_values, positions, {})
            self._score_layer(module, layer_idx, query, query_positions, scale, dense)
            self.stats.score_seconds += time.perf_counter() - start
        return output

    def _score_layer(self, module, layer_idx: int, query, query_positions, scale: float, dense=None) -> None:
        """Score layer ``layer_idx``'s slots; ``dense``: its ``dense_view()`` when the caller already has it."""
        cache = self.cache
        layer = cache.layers[layer_idx]
        keys, values, positions, state = layer.dense_view() if dense is None else dense
        batch, heads = layer.batch_size, layer.num_heads
        q = query.shape[2]
        candidates = positions >= 0
        if self._observer_from is not None:
            candidates &= positions < self._observer_from[:, None, None]
        captured = self._captured[layer_idx]
        ctx = LayerContext(
            layer_idx=layer_idx,
            num_layers=self.spec.num_layers,
            module=module,
            keys=keys,
            values=values,
            positions=positions,
            candidates=candidates,
            queries=query,
            query_positions=query_positions,
            new_slots=(layer.lengths - q).reshape(batch, heads),
            scale=scale,
            window_size=q if self._observer_from is not None else max(self.window, 1),
            hidden_states=captured.get("hidden_states"),
            pre_rope_queries=captured.get("pre_rope_queries"),
            pre_rope_keys=captured.get("pre_rope_keys"),
            pre_rope_values=captured.get("pre_rope_values"),
            replay=self._replay_chunk,
            state=state,
        )
        scores = self.scorer.score(ctx).float()
        if scores.shape != positions.shape:
            raise ValueError(f"scorer {self.scorer!r} returned shape {tuple(scores.shape)}, expected {tuple(positions.shape)}")
        scores = scores.masked_fill(~candidates, float("-inf"))
        last = torch.where(candidates, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
        row_start = self._row_start.to(positions.device)[:, None, None]
        protected = candidates & ((positions - row_start < self.sinks) | (positions > last - self.window))
        # allocators observe the prompt's own window, not a replay (KVzip)
        if getattr(self.allocator, "needs_window_attention", False) and self._replay_chunk is None:
            self.allocator.observe_layer(layer_idx, ctx.window_attention(), candidates)
        self._scores[layer_idx] = (scores, protected)
        names = [n for n in self.scorer.state_names if n in ctx.state]
        if names:
            layer.write_state({n: ctx.state[n] for n in names})
        captured.clear()
        # not while query observers run: the prompt forward already filled every layer, there is no peak to cut;
        # not for replaying scorers: their scores exist only after the replay (the allocation then runs once)
        if (getattr(self.allocator, "cascade", False) and self._phase == "prefill" and self._observer_from is None
                and not self.scorer.replays):
            self._cascade(layer_idx)

    def _cascade(self, layer_idx: int) -> None:
        """Cascading allocators (CAKE): once layer m is scored (its attention already computed), re-allocate the
        budget over layers 0..m and re-evict them with their stored scores, so the prefill never holds more than the
        budget plus one uncompressed layer. Stored scores are gathered along, to stay aligned with the slots."""
        cache = self.cache
        layers = range(layer_idx + 1)
        inputs = AllocationInput(
            scores=[self._scores[l][0] for l in layers],
            protected=[self._scores[l][1] for l in layers],
            budget=self._budget_rows.to(self._scores[layer_idx][0].device),
            window=self.window,
        )
        held = torch.zeros_like(self._budget_rows)  # tokens per head still held by the later layers (chunked)
        for later in cache.layers[layer_idx + 1 :]:
            if later.is_initialized and later.lengths.numel():
                held += later.lengths.reshape(later.batch_size, later.num_heads).amax(-1).to(held.device)
        plan = self.allocator.cascade_allocate(inputs, self.spec.num_layers, held)
        self.stats.cascade_peak_kv_bytes = max(self.stats.cascade_peak_kv_bytes, cache.kv_bytes())
        for l in layers:
            cache.layers[l].compact(plan.indices[l], plan.counts[l], 0)
            scores, protected = self._scores[l]
            self._scores[l] = (
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
    scorer: str | Scorer = "snapkv",
    allocator: str | Allocator = "uniform",
    budget: float | int | Budget = 0.1,
    prefill: str = "one_shot",
    chunk_size: int = 512,
    window: int = 32,
    sinks: int = 4,
    decode_budget: float | int | None = None,
    query: torch.Tensor | None = None,
    reserve: int | None = None,
    record: bool = False,
    merge: str | Merger | None = None,
) -> Iterator[CompressionSession]:
    """Compress the KV cache of every generation/forward run inside the block.

    model:          a supported causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3 families)
    scorer:         scorer name (``gatekv.scorers.available_scorers()``) or instance
    allocator:      allocator name (``gatekv.available_allocators()``: uniform, adakv, pyramid, global, cake, ...) or instance
    budget:         tokens kept per KV head: a ratio of the prompt (float in (0, 1]) or a count (int); protected
                    tokens included. A budget covering the whole prompt is a no-op (the model runs untouched).
    prefill:        ``one_shot`` (full prefill, then compact) or ``chunked`` (evict after each ``chunk_size`` tokens)
    window, sinks:  recent tokens and first tokens that are always kept; ``window`` is also the observation window
    decode_budget:  keep the cache at this size while generating (ratio of the prompt or a count); None = grow
    query:          token ids (q,) or (B, q): query-aware scoring with these tokens as the observation window
                    (they are not kept); None = the prompt's own last tokens observe
    reserve:        free slots per (row, head) after compaction, so decoding appends without copying. None (default):
                    sized from ``model.generate``'s ``max_new_tokens`` (or ``session.expect_new_tokens``), else 1/64
                    of the prompt (at most 64) regrown geometrically: KV bytes stay at the budget + the generated
                    tokens + <= 2% of the full cache. An int: exactly that room after every compaction.
    record:         keep the kept positions of every eviction in ``stats.events`` (tests, analysis)
    merge:          merger name (``ems``, ``d2o``, ``kvmerger``, ``razor``; ``gatekv.merge``) or instance: dropped
                    tokens are merged into kept ones at every eviction (not at a cascade allocator's inner steps)
    """
    session = CompressionSession(
        model, scorer, allocator, budget, prefill, chunk_size, window, sinks, decode_budget, query, reserve, record,
        merge,
    )
    session._enter()
    try:
        yield session
    finally:
        session._exit()


def _check_trained_scorers(model, scorer: Scorer) -> None:
    """``ValueError`` if trained heads (a scorer with a ``config.fingerprint``) were made for a model of another
    fingerprint than ``model``; ``Adapter.heads_for(model, allow_mismatch=True)`` is the explicit override."""
    from gatekv.heads.config import ModelFingerprint

    for one in getattr(scorer, "scorers", {}).values() if isinstance(scorer, _ScoreSet) else [scorer]:
        fingerprint = getattr(getattr(one, "config", None), "fingerprint", None)
        if not isinstance(fingerprint, ModelFingerprint):
            continue
        model_print = ModelFingerprint.from_model(model)
        if getattr(one, "accepted_fingerprint", None) != model_print:
            fingerprint.check_matches(model_print, what=f"scorer ({type(one).__name__} heads)")


class _ScoreSet(Scorer):
    """Several scorers over the same layer contexts (one shared prefill): each one's ``(B, H_kv, T)`` scores, ``-inf``
    on non-candidate slots as the session masks them, are kept per layer in ``results[name][layer]``; the first one's
    are returned."""

    def __init__(self, scorers: dict[str, Scorer]):
        replaying = [name for name, s in scorers.items() if s.replays]
        if len(replaying) > 1:
            raise ValueError(f"a shared prefill takes at most one replaying scorer (each replays its own inputs), got {replaying}")
        self.scorers = scorers
        self.replays = bool(replaying)
        self._replaying = scorers[replaying[0]] if replaying else None
        self.needs = frozenset().union(*(s.needs for s in scorers.values()))
        self.state_names = tuple(dict.fromkeys(n for s in scorers.values() for n in s.state_names))
        self.results: dict[str, dict[int, torch.Tensor]] = {name: {} for name in scorers}

    def replay_inputs(self, token_ids, token_positions, start, end):
        return self._replaying.replay_inputs(token_ids, token_positions, start, end)

    def trim(self, layer_idx: int, width: int) -> None:
        """Drop slots past ``width`` from the stored scores of layer ``layer_idx`` (a replay's KV was dropped)."""
        for results in self.results.values():
            if layer_idx in results:
                results[layer_idx] = results[layer_idx][..., :width]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        first = None
        for name, scorer in self.scorers.items():
            if ctx.replay is not None and not scorer.replays:
                continue  # a replay forward is scored by the replaying scorer only
            scores = scorer.score(ctx).float()
            if scores.shape != ctx.positions.shape:
                raise ValueError(f"scorer {name!r} returned shape {tuple(scores.shape)}, expected {tuple(ctx.positions.shape)}")
            self.results[name][ctx.layer_idx] = scores.masked_fill(~ctx.candidates, float("-inf"))
            first = scores if first is None else first
        return first


class SharedPrefill:
    """One prefill scored by several scorers; :meth:`fork` compacts a copy of its full cache per (scorer, allocator,
    budget). Every fork equals what :func:`compress` with that scorer, allocator and budget (one-shot prefill) builds
    for the same prompt, at the cost of one prefill for all of them. Made by :func:`shared_prefill`."""

    def __init__(self, session: CompressionSession, score_set: _ScoreSet):
        self.session = session
        self._score_set = score_set

    @property
    def scorer_names(self) -> list[str]:
        return list(self._score_set.scorers)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``input_ids`` (B, T) once, scoring every layer with every scorer; returns the last
        position's logits (B, vocab). The full cache is kept until the next :meth:`prefill`."""
        session = self.session
        session._held = {}
        for results in self._score_set.results.values():
            results.clear()
        model = session.model
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                       **{cache_kwarg(model): session.new_cache()})
        if "cache" not in session._held:
            raise RuntimeError("shared prefill: the forward was not scored (no compressible prompt)")
        self._base_stats = session.stats
        return output.logits[:, -1]

    def fork(self, scorer: str, allocator: str | Allocator = "uniform", budget: float | int | Budget = 0.1,
             merge: str | Merger | None = None) -> tuple[CompressedCache, CompressionStats]:
        """A compacted copy of the prefilled cache: ``scorer``'s scores, ``allocator``, ``budget`` (ratio or count
        per head), optional ``merge``. Returns ``(cache, stats)``; continue generating on ``cache`` inside the
        :func:`shared_prefill` block (pass the whole prompt, as after a query-agnostic prefill)."""
        session = self.session
        held = session._held
        if not held or "cache" not in held:
            raise RuntimeError("fork() needs a prefill() first")
        if scorer not in self._score_set.results:
            raise ValueError(f"scorer {scorer!r} was not scored in this prefill; scored: {self.scorer_names}")
        allocator = get_allocator(allocator)
        if getattr(allocator, "cascade", False) or getattr(allocator, "needs_window_attention", False):
            raise ValueError(f"allocator {allocator!r} observes the prefill itself (cascade/window attention): "
                             "it cannot run on a shared prefill; use compress()")
        merger = None if merge is None else get_merger(merge)
        if hasattr(merger, "reset"):
            merger.reset()
        budget = _resolve_budget(budget, "budget")
        base = self._base_stats
        lengths = base.prompt_tokens.to(held["cache"].layers[0].lengths.device)
        budget_rows = session._budget_tokens(budget, lengths)
        cache = copy.deepcopy(held["cache"])
        scores = [self._score_set.results[scorer][l] for l in range(session.spec.num_layers)]
        event = session._evict(cache, "prefill", scores, held["protected"], allocator, budget_rows, merger)
        stats = CompressionStats(prompt_tokens=base.prompt_tokens, budget_tokens=budget_rows.cpu(),
                                 full_kv_bytes=base.full_kv_bytes, events=[event], compact_seconds=event.seconds)
        return cache, stats


@contextlib.contextmanager
def shared_prefill(
    model: torch.nn.Module,
    scorers: dict[str, str | Scorer],
    window: int = 32,
    sinks: int = 4,
    reserve: int | None = None,
    record: bool = False,
) -> Iterator[SharedPrefill]:
    """Evaluate many (scorer, allocator, budget) settings on one prompt with a single prefill (one-shot mode)::

        with shared_prefill(model, {"snapkv": "snapkv", "heads": adapter_heads}) as shared:
            shared.prefill(context_ids)                       # query-agnostic: the context alone
            for name, allocator, budget in settings:
                cache, stats = shared.fork(name, allocator, budget)
                out = model.generate(torch.cat([context_ids, question_ids], 1), cache=cache)

    scorers: label -> scorer name or instance (scored together on the same forward; their ``needs`` are merged)
    window, sinks, reserve, record: as in :func:`compress`
    """
    if not scorers:
        raise ValueError("scorers must not be empty")
    score_set = _ScoreSet({name: get_scorer(s) for name, s in scorers.items()})
    session = CompressionSession(model, score_set, "uniform", 1.0, "one_shot", window=window, sinks=sinks,
                                 reserve=reserve, record=record)
    session._held = {}
    session._enter()
    try:
        yield SharedPrefill(session, score_set)
    finally:
        session._held = None
        session._exit()
