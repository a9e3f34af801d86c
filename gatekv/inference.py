"""``GateKV``: a model + a scorer (trained adapter or training-free name) + a budget, with ``generate`` and ``answer``.

    from gatekv import GateKV

    kv = GateKV.from_pretrained("smollm2", adapter="checkpoints/smollm2-135m-retaining-heads", budget=0.1,
                                allocator="adakv")
    result = kv.answer(document, "What is the access code?", query_aware=False)
    print(result.text, result.stats.summary())

    kv = GateKV(model, tokenizer, scorer="snapkv", budget=0.2)        # an already-loaded model, any dtype/device
    out = kv.generate(input_ids, attention_mask=mask, max_new_tokens=64, streamer=streamer)

Everything runs inside ``gatekv.compress`` (and, for adapters trained with LoRA, inside ``LoraWeights.applied``), so
the model is exactly as it was after every call. ``scorer=None`` without an adapter is the full cache (plain
``model.generate``), which makes comparisons one argument apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from gatekv.compress import CompressionStats, compress
from gatekv.chat import chat_template_parts
from gatekv.models import cache_kwarg, load_base_model, output_cache
from gatekv.settings import CompressionConfig

__all__ = ["Answer", "GateKV"]


@dataclass
class Answer:
    """What :meth:`GateKV.answer` produced for one (context, question)."""

    text: str
    """The generated answer, special tokens removed."""
    prompt_tokens: int
    new_tokens: int
    seconds: float
    """Wall time of compression + generation."""
    kv_bytes: int
    """KV bytes held at the end (keys + values, capacity included); the full cache's when not compressed."""
    full_kv_bytes: int
    """KV bytes a full cache would hold at the end, same dtype."""
    stats: CompressionStats | None = field(default=None, repr=False)
    """The compression session's stats (None for the full cache)."""

    def stats_line(self) -> str:
        """One line: tokens, time, KV bytes vs full."""
        ratio = self.kv_bytes / max(self.full_kv_bytes, 1)
        kept = ""
        if self.stats is not None and self.stats.events:
            tokens = self.stats.events[-1].kept_tokens.double()
            kept = f"kept {tokens.mean():.0f} tokens per KV head (min {int(tokens.min())}, max {int(tokens.max())}); "
        elif self.stats is not None and self.stats.noop:
            kept = "budget covers the prompt (no compression); "
        return (
            f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens in {self.seconds:.2f} s; {kept}"
            f"KV {self.kv_bytes / 2**20:.2f} MiB vs full {self.full_kv_bytes / 2**20:.2f} MiB ({ratio:.3f}x)"
        )


def _rank_mix(weights, heads, scorer):
    """The :class:`~gatekv.scorers.rank_mix.RankMixScorer` of ``weights`` (label -> weight): ``"adapter"`` is
    ``heads`` (the adapter's, None without one), other labels are training-free scorer names. ``scorer``: what the
    caller passed besides (refused without an adapter: the mix replaces it)."""
    from gatekv.scorers.rank_mix import RankMixScorer, split_mix_spec

    try:
        weights, options = split_mix_spec(weights)
    except ValueError as error:
        raise ValueError(f"GateKV: {error}") from None
    if heads is None and scorer is not None:
        raise ValueError("GateKV: give either scorer or rank_mix (the mix is the scorer)")
    if heads is not None and "adapter" not in weights:
        raise ValueError(f"GateKV: rank_mix must weigh the adapter's heads (label 'adapter'), got {sorted(weights)}")
    if heads is None and "adapter" in weights:
        raise ValueError("GateKV: rank_mix names 'adapter' but no adapter was given")
    members = {label: heads if label == "adapter" else label for label in weights}
    return RankMixScorer(members, weights, **options)


class GateKV:
    """A causal LM with a compressed KV cache.

    model:      a supported transformers causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3), any dtype and device
    tokenizer:  its tokenizer (needed by :meth:`answer`; left padding is used for batches)
    scorer:     a training-free scorer name or instance, or None for the full cache (ignored with ``adapter``)
    adapter:    an :class:`~gatekv.heads.Adapter`, or a directory / Hub id of one: its trained heads are the scorer
    allocator:  ``uniform``, ``adakv``, ``pyramid`` (name or instance)
    budget:     tokens kept per KV head: a ratio of the prompt (0.1) or a count (512)
    prefill:    ``one_shot`` or ``chunked``
    allow_mismatch: accept an adapter made for a model with a different fingerprint (expert use)
    heads_dtype: the adapter's heads compute in this dtype (``"bfloat16"`` or a ``torch.dtype``; None: as stored),
                e.g. bf16 gates on a CPU with AMX next to a float32 model (:meth:`~gatekv.heads.Adapter.heads_for`)
    rank_mix:   blend rankings within each head (:class:`~gatekv.scorers.rank_mix.RankMixScorer`): label -> weight,
                where ``"adapter"`` is the adapter's heads and any other label a training-free scorer name, e.g.
                ``{"adapter": 0.75, "defensivekv": 0.25}``, or ``{"weights": {...}, "quota": {label: share},
                "combine": "sum" | "max"}``; replaces ``scorer``
    config:     all the settings as one :class:`~gatekv.settings.CompressionConfig` (instead of allocator, budget,
                prefill and ``compress_options``; its scorer is used unless ``scorer`` or ``adapter`` is given)
    compress_options: further :func:`gatekv.compress` arguments (window, sinks, observe_window, chunk_size,
                decode_budget, reserve)

    The settings are validated once, here, into :attr:`config` (:class:`~gatekv.settings.CompressionConfig`; its
    scorer is this wrapper's, or the default one for the full cache, which does not use it).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        scorer=None,
        adapter=None,
        allocator=CompressionConfig.allocator,
        budget: float | int = CompressionConfig.budget,
        prefill: str = CompressionConfig.prefill,
        allow_mismatch: bool = False,
        config: CompressionConfig | None = None,
        rank_mix: dict[str, float] | None = None,
        heads_dtype=None,
        **compress_options,
    ):
        from gatekv.heads.adapter import Adapter

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a loaded transformers model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: Adapter | None = None
        if adapter is not None:
            self.adapter = adapter if isinstance(adapter, Adapter) else Adapter.from_pretrained(adapter)
            scorer = self.adapter.heads_for(model, allow_mismatch=allow_mismatch, dtype=heads_dtype)
            if self.adapter.lora is not None:
                self.adapter.lora.check_model(model)
        elif heads_dtype is not None:
            raise ValueError("GateKV: heads_dtype applies to an adapter's heads, and no adapter was given")
        if rank_mix is not None:
            scorer = _rank_mix(rank_mix, scorer if self.adapter is not None else None, scorer)
        if config is None:  # validated now, not at the first call
            config = CompressionConfig(scorer if scorer is not None else CompressionConfig.scorer, allocator, budget,
                                       prefill, **compress_options)
        else:
            defaults = (CompressionConfig.allocator, CompressionConfig.budget, CompressionConfig.prefill)
            if any(a is not b for a, b in zip((allocator, budget, prefill), defaults)) or compress_options:
                raise ValueError("GateKV: pass either config or allocator/budget/prefill/options, not both")
            if scorer is None:
                scorer = config.scorer
        if tokenizer is not None and scorer is not None:
            from gatekv.scorers import get_scorer

            instance = get_scorer(scorer)
            if instance.uses_tokenizer:  # e.g. KVzip's repeat prompt in the tokenizer's chat template
                scorer = instance.bind_tokenizer(tokenizer)
        if scorer is not None and scorer is not config.scorer:
            config = config.with_scorer(scorer)
        self.scorer = scorer
        self.config = config
        """The compression settings of every call (validated once); ``session(**overrides)`` replaces fields."""
        self.last_stats: CompressionStats | None = None

    @classmethod
    def from_pretrained(
        cls,
        base_model_or_id=None,
        adapter=None,
        *,
        scorer=None,
        budget: float | int = CompressionConfig.budget,
        allocator=CompressionConfig.allocator,
        prefill: str = CompressionConfig.prefill,
        config: CompressionConfig | None = None,
        tokenizer=None,
        revision: str | None = None,
        adapter_revision: str | None = None,
        dtype: torch.dtype | None = None,
        device=None,
        allow_mismatch: bool = False,
        rank_mix: dict[str, float] | None = None,
        heads_dtype=None,
        **compress_options,
    ) -> "GateKV":
        """Build from a loaded model or a model name (``"smollm2"``, Hub id, path) and an adapter or a scorer name.

        base_model_or_id: a loaded model (used as is), a name/path, or None = the adapter's own ``base_model``
        adapter:          an :class:`Adapter`, a local directory or a Hub id (``adapter_revision``)
        config:           the compression settings as one :class:`~gatekv.settings.CompressionConfig` (instead of
                          budget, allocator, prefill and ``compress_options``), as in :class:`GateKV`
        """
        from gatekv.heads.adapter import Adapter

        if adapter is not None and not isinstance(adapter, Adapter):
            adapter = Adapter.from_pretrained(adapter, revision=adapter_revision)
        if isinstance(base_model_or_id, torch.nn.Module):
            model = base_model_or_id
        else:
            name = base_model_or_id
            if name is None:
                if adapter is None or not adapter.base_model:
                    raise ValueError("base_model_or_id is required (the adapter does not name its base model)")
                name, revision = adapter.base_model, revision or adapter.base_revision
            if isinstance(name, os.PathLike):
                name = str(name)
            model, loaded_tokenizer = load_base_model(name, revision=revision, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        return cls(model, tokenizer, scorer=scorer, adapter=adapter, allocator=allocator, budget=budget, prefill=prefill,
                   allow_mismatch=allow_mismatch, config=config, rank_mix=rank_mix, heads_dtype=heads_dtype,
                   **compress_options)

    # -- the settings ---------------------------------------------------------------------------------------------------
    @property
    def allocator(self):
        """Allocator name or instance (:attr:`config`)."""
        return self.config.allocator

    @property
    def budget(self) -> float | int:
        """Tokens kept per KV head: a ratio of the prompt or a count (:attr:`config`)."""
        return self.config.budget.value

    @property
    def prefill(self) -> str:
        """``one_shot`` or ``chunked`` (:attr:`config`)."""
        return self.config.prefill

    @property
    def compress_options(self) -> dict:
        """The other settings of :attr:`config` that differ from the defaults (window, sinks, reserve, merge, ...)."""
        defaults = CompressionConfig()
        names = [f.name for f in dataclasses.fields(CompressionConfig)
                 if f.name not in ("scorer", "allocator", "budget", "prefill")]
        return {n: getattr(self.config, n) for n in names if getattr(self.config, n) is not getattr(defaults, n)
                and not _equal(getattr(self.config, n), getattr(defaults, n))}

    # -- the context everything runs in ---------------------------------------------------------------------------------
    @property
    def compresses(self) -> bool:
        """False for the full cache (no scorer, no adapter)."""
        return self.scorer is not None

    @contextlib.contextmanager
    def session(self, **overrides):
        """LoRA applied (if the adapter has it) + ``gatekv.compress`` with this wrapper's settings (``overrides``
        replace any of budget/allocator/prefill/window/...). Yields the session, or None for the full cache."""
        scorer = overrides.pop("scorer", self.scorer)
        with contextlib.ExitStack() as stack:
            if self.adapter is not None and self.adapter.lora is not None:
                stack.enter_context(self.adapter.lora.applied(self.model))
            if scorer is None:
                yield None
                return
            config = self.config.replace(scorer=scorer, **overrides) if overrides or scorer is not self.scorer \
                else self.config
            session = stack.enter_context(compress(self.model, config=config))
            yield session
            self.last_stats = session.stats

    # -- generation -------------------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """``model.generate`` with the compressed cache (batch > 1 with left padding, streamers, any decoding options).

        Returns what ``model.generate`` returns; the session's stats are in :attr:`last_stats`.
        """
        for name in ("cache", "past_key_values"):
            if name in generate_kwargs:
                raise ValueError(f"{name}: GateKV creates the compressed cache itself")
        overrides = {k: generate_kwargs.pop(k) for k in ("budget", "allocator", "prefill") if k in generate_kwargs}
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask.to(device)
        if not self.compresses:
            _warn_if_too_long(self.model, input_ids.shape[-1])
        self._default_stop(generate_kwargs)
        with torch.no_grad(), self.session(**overrides):
            return self.model.generate(input_ids, **generate_kwargs)

    def answer(
        self,
        context: str,
        question: str,
        *,
        query_aware: bool = True,
        max_new_tokens: int = 64,
        chat: bool | None = None,
        streamer=None,
        **overrides,
    ) -> Answer:
        """Answer ``question`` about ``context`` greedily (the long-context QA pattern).

        query_aware: True = the question is at the end of the prompt when the cache is compressed (inside the scorers'
                     observation window); False = the context is compressed before the question is seen (cache
                     reuse across questions), then the question is appended to the compressed cache
        chat:        wrap in the tokenizer's chat template as one user turn (default: when it has one)
        overrides:   budget / allocator / prefill / window / ... for this call
        """
        if self.tokenizer is None:
            raise ValueError("answer() needs a tokenizer: pass one to GateKV(model, tokenizer, ...)")
        if not isinstance(context, str) or not isinstance(question, (str, type(None))):
            raise TypeError("context must be a string and question a string or None")
        if not context.strip():
            raise ValueError("context: the prompt is empty")
        context_ids, full_ids, options = self._prompt(context, question, chat, max_new_tokens, streamer=streamer)
        if full_ids.shape[1] == context_ids.shape[1]:
            query_aware = True  # nothing follows the context: compressing "before the question" is the same thing
        if not self.compresses:
            _warn_if_too_long(self.model, full_ids.shape[1])  # compress() warns itself when it is in the loop
        start = time.perf_counter()
        stats = None
        with torch.no_grad(), self.session(**overrides) as session:
            if session is None:
                output = self.model.generate(full_ids, **options)
            else:
                # compress() makes the cache at the prefill, or keeps the plain one when the budget covers the prompt
                # (a no-op, like compress() itself); a cache passed in here would always be a compressed one
                extra = {}
                if not query_aware:
                    prefill = self.model(input_ids=context_ids, use_cache=True, logits_to_keep=1)
                    extra[cache_kwarg(self.model)] = output_cache(prefill)
                output = self.model.generate(full_ids, **extra, **options)
                stats = session.stats
            cache = output_cache(output)
            held = cache.kv_bytes() if hasattr(cache, "kv_bytes") else _dense_cache_bytes(cache)
        return _make_answer(self.model, self.tokenizer, output.sequences, full_ids.shape[1], held, stats,
                            time.perf_counter() - start, options.get("eos_token_id"))

    def answer_settings(
        self,
        context: str,
        question: str,
        settings: list[dict],
        *,
        scorers: dict | None = None,
        max_new_tokens: int = 64,
        chat: bool | None = None,
    ) -> list[Answer]:
        """Answer ``question`` query-agnostically under several compression settings with one shared prefill of
        ``context`` (:func:`gatekv.compress.shared_prefill`): each answer equals what :meth:`answer` with
        ``query_aware=False`` and that setting gives, at the cost of one context prefill for all of them.

        settings: dicts with ``scorer`` (a key of ``scorers``; default: this wrapper's scorer), ``allocator``,
                  ``budget`` and optionally ``merge``
        scorers:  label -> scorer name or instance (default: ``{"default": self.scorer}``)
        """
        from gatekv.compress import shared_prefill

        if self.tokenizer is None:
            raise ValueError("answer_settings() needs a tokenizer")
        if self.adapter is not None and self.adapter.lora is not None:
            raise ValueError("an adapter with LoRA changes the model's prefill: it cannot share one; use answer()")
        scorers = scorers or ({"default": self.scorer} if self.scorer is not None else {})
        if not scorers:
            raise ValueError("answer_settings() needs scorers (the full cache has nothing to share)")
        context_ids, full_ids, options = self._prompt(context, question, chat, max_new_tokens)
        config = self.config
        answers = []
        with torch.no_grad(), shared_prefill(self.model, scorers, window=config.window, sinks=config.sinks,
                                             reserve=config.reserve, observe_window=config.observe_window) as shared:
            start = time.perf_counter()
            shared.prefill(context_ids)
            prefill_seconds = time.perf_counter() - start
            for setting in settings:
                unknown = sorted(set(setting) - {"scorer", "allocator", "budget", "merge"})
                if unknown:
                    raise ValueError(f"settings: unknown keys {unknown} (valid: scorer, allocator, budget, merge)")
                start = time.perf_counter()
                cache, stats = shared.fork(setting.get("scorer", next(iter(scorers))),
                                           setting.get("allocator", self.allocator),
                                           setting.get("budget", config.budget), setting.get("merge"))
                output = self.model.generate(full_ids, **{cache_kwarg(self.model): cache}, **options)
                seconds = prefill_seconds + time.perf_counter() - start  # each answer is charged the shared prefill
                answers.append(_make_answer(self.model, self.tokenizer, output.sequences, full_ids.shape[1],
                                            cache.kv_bytes(), stats, seconds, options.get("eos_token_id")))
        return answers

    def _prompt(self, context: str, question: str | None, chat, max_new_tokens: int, **options):
        """``(context_ids (1, T_c), full_ids (1, T_c + T_q), greedy generate options)`` on the model's device."""
        context_ids, question_ids = prompt_ids(self.tokenizer, context, question or "", chat=chat)
        device = next(self.model.parameters()).device
        context_ids = context_ids.to(device)
        full_ids = torch.cat([context_ids, question_ids.to(device)], dim=1)
        options = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **options)
        self._default_stop(options)
        return context_ids, full_ids, options

    def _default_stop(self, kwargs: dict) -> None:
        config = getattr(self.model, "generation_config", None)
        if "eos_token_id" not in kwargs and config is not None and config.eos_token_id is not None:
            kwargs["eos_token_id"] = config.eos_token_id
        if "pad_token_id" not in kwargs:
            pad = None if config is None else config.pad_token_id
            if pad is None and self.tokenizer is not None:
                pad = self.tokenizer.pad_token_id
            if pad is None:
                pad = _as_list(kwargs.get("eos_token_id"))[:1] or [None]
                pad = pad[0]
            if pad is not None:
                kwargs["pad_token_id"] = pad

    def __repr__(self) -> str:
        what = self.adapter.describe() if self.adapter else (self.scorer or "full cache")
        return f"GateKV({type(self.model).__name__}, {what}, allocator={self.allocator!r}, budget={self.budget})"


def _make_answer(model, tokenizer, sequences, prompt_length: int, held: int, stats, seconds: float, eos) -> Answer:
    """The :class:`Answer` of one generated row ``sequences[0]`` (the stop token is not part of the text)."""
    from gatekv.cache import full_cache_kv_bytes

    new = sequences[0, prompt_length:]
    stop = set(_as_list(eos))
    while new.numel() and int(new[-1]) in stop:
        new = new[:-1]
    dtype = next(model.parameters()).dtype
    return Answer(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        prompt_tokens=prompt_length,
        new_tokens=sequences.shape[1] - prompt_length,
        seconds=seconds,
        kv_bytes=held,
        full_kv_bytes=full_cache_kv_bytes(model.config, 1, sequences.shape[1] - 1, dtype),
        stats=stats,
    )


def prompt_ids(tokenizer, context: str, question: str, chat: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids (1, T_c), question_ids (1, T_q))`` of one prompt ``context + "\\n\\n" + question``
    (``question`` may be empty: then only the chat template's tail follows the context).

    chat: wrap as one user turn of the tokenizer's chat template (template head before the context; end of turn and
          assistant header after the question); default: when the tokenizer has a chat template
    """
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    head, tail = ("", "\n")
    if chat:
        head, tail = chat_template_parts(tokenizer)
    context_ids = tokenizer(head + context, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    question_text = ("\n\n" + question if question else "") + tail
    question_ids = tokenizer(question_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return context_ids, question_ids


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _warn_if_too_long(model, prompt_tokens: int) -> None:
    """Warn (once per call) when the prompt is longer than the model's ``max_position_embeddings``."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and prompt_tokens > limit:
        warnings.warn(f"the prompt has {prompt_tokens} tokens, more than the model's max_position_embeddings "
                      f"{limit}: outputs past that length are unreliable", stacklevel=3)


def _dense_cache_bytes(cache) -> int:
    """Keys + values bytes of a transformers cache with dense layers (``DynamicCache``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _equal(a, b) -> bool:
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and type(a) is type(b) and a == b
