"""Training-time forwards of the frozen model: capture what heads read, compute CIS labels, add gate biases.

``TrainingCapture`` is a context manager around a supported causal LM. Inside it the model's attention runs through
``gatekv_train`` (registered with transformers' AttentionInterface; masks are built like SDPA's), which sees the
post-RoPE queries and keys exactly as attention does (Qwen3 q/k-norm and Phi-3 partial rotary included). Per forward
the caller may ask for

- **CIS labels** (``label_queries``): per layer ``(B, H_kv, T)`` = max over the given query rows and the GQA group of
  the pre-softmax logit ``q_i . k_j * scale`` (``gatekv.kernels.column_max_logits``, chunked, never ``T x T``);
- **gate biases** (``bias_fn``): an additive ``(B, H_kv, T_k)`` log-mask on keys, applied only to query rows at or
  after each row's ``bias_from`` position (the response: the prompt's own rows stay exact).

Captured head inputs (``gatekv.models.capture_layer_inputs``: hidden states, pre-RoPE q/k/v of the tokens of the
forward) are left in ``sinks[layer]``. Everything is undone on exit (hooks removed, attention implementation
restored), also on errors.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from gatekv import kernels
from gatekv.models import ModelSpec, capture_layer_inputs, inspect_model

__all__ = ["TRAIN_ATTENTION", "TrainingCapture"]

TRAIN_ATTENTION = "gatekv_train"
_CAPTURES: "weakref.WeakKeyDictionary[torch.nn.Module, TrainingCapture]" = weakref.WeakKeyDictionary()


def _train_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function ``gatekv_train``: query (B, H_q, q, d), key/value (B, H_kv, T_k, d) post-RoPE."""
    capture = _CAPTURES.get(module)
    if capture is None:
        raise RuntimeError(f"attention implementation {TRAIN_ATTENTION!r} is only usable inside TrainingCapture")
    return capture._attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if TRAIN_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(TRAIN_ATTENTION, _train_attention_forward)
    if TRAIN_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(TRAIN_ATTENTION, sdpa_mask)


class TrainingCapture:
    """Context manager: training-time forwards of ``model`` (see the module docstring).

    model:  a supported causal LM (its base model when wrapped by peft: LoRA layers are injected in place)
    hidden: capture each layer's attention input hidden states (B, q, D) into ``sinks[layer]``
    pre_rope: capture pre-RoPE q/k/v into ``sinks[layer]``
    """

    def __init__(self, model: torch.nn.Module, hidden: bool = False, pre_rope: bool = False):
        self.model = model
        self.spec: ModelSpec = inspect_model(model)
        self.hidden, self.pre_rope = hidden, pre_rope
        self.sinks: list[dict] = [{} for _ in range(self.spec.num_layers)]
        self.labels: list[torch.Tensor | None] = [None] * self.spec.num_layers
        # per-forward settings (see ``prepare``)
        self.label_queries: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key_valid: torch.Tensor | None = None
        self.query_positions: torch.Tensor | None = None
        self.bias_fn: Callable[[int], torch.Tensor | None] | None = None
        self.bias_from: torch.Tensor | None = None
        self.keep_prefix: int | None = None
        self.use_prefix = False
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.spec.num_layers
        self._handles: list = []
        self._original_impl: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrainingCapture":
        for module in self.spec.attention_modules:
            if module in _CAPTURES:
                raise RuntimeError("this model is already inside a TrainingCapture")
        _register()
        self._original_impl = self.model.config._attn_implementation
        try:
            for layer in range(self.spec.num_layers):
                self._handles += capture_layer_inputs(self.spec, layer, self.sinks[layer], self.hidden, self.pre_rope)
            for module in self.spec.attention_modules:
                _CAPTURES[module] = self
            self.model.set_attn_implementation(TRAIN_ATTENTION)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.spec.attention_modules:
            if _CAPTURES.get(module) is self:
                del _CAPTURES[module]
        if self._original_impl is not None and self.model.config._attn_implementation != self._original_impl:
            self.model.set_attn_implementation(self._original_impl)
        self.clear()

    def clear(self) -> None:
        """Drop captured inputs, labels and per-forward settings."""
        for sink in self.sinks:
            sink.clear()
        self.labels = [None] * self.spec.num_layers
        self.prefix_kv = [None] * self.spec.num_layers
        self.label_queries = self.key_valid = self.query_positions = self.bias_fn = self.bias_from = None
        self.keep_prefix, self.use_prefix = None, False

    def prepare(
        self,
        key_valid: torch.Tensor,
        query_positions: torch.Tensor,
        label_queries: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias_fn: Callable[[int], torch.Tensor | None] | None = None,
        bias_from: torch.Tensor | None = None,
        keep_prefix: int | None = None,
        use_prefix: bool = False,
    ) -> None:
        """Settings of the next forward.

        key_valid:       (B, T_k) bool, False for padding keys (T_k = cached + new tokens; key j has position j)
        query_positions: (B, q) int64 positions of the forward's tokens
        label_queries:   ``(rows (B, n) int64 indices into the forward's tokens, positions (B, n) with -1 = none)``:
                         compute CIS labels over those query rows into ``labels[layer]`` (B, H_kv, T_k)
        bias_fn:         ``layer -> (B, H_kv, T_k)`` additive key bias (or None for no bias in that layer)
        bias_from:       (B,) position from which query rows receive the bias
        keep_prefix:     store each layer's keys/values of the first ``keep_prefix`` tokens (detached) in ``prefix_kv``
        use_prefix:      this forward continues after the stored prefix: its keys/values are prepended in every layer
                         (the forward's own tokens then start at position ``keep_prefix`` of the previous forward)
        """
        self.key_valid, self.query_positions = key_valid, query_positions
        self.label_queries, self.bias_fn, self.bias_from = label_queries, bias_fn, bias_from
        self.keep_prefix, self.use_prefix = keep_prefix, use_prefix
        self.labels = [None] * self.spec.num_layers

    # -- attention -----------------------------------------------------------------------------------------------
    def _attend(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.keep_prefix is not None:
            self.prefix_kv[layer] = (key[:, :, : self.keep_prefix].detach(), value[:, :, : self.keep_prefix].detach())
        if self.use_prefix:
            prefix_key, prefix_value = self.prefix_kv[layer]
            key, value = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
        if self.label_queries is not None:
            rows, positions = self.label_queries
            index = rows[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])
            chosen = torch.gather(query.detach(), 2, index)  # (B, H_q, n, d)
            key_positions = self._key_positions(key.shape[2], key.device)
            with torch.no_grad():
                self.labels[layer] = kernels.column_max_logits(chosen, positions, key.detach(), key_positions, scale)
        bias = self.bias_fn(layer) if self.bias_fn is not None else None
        if bias is None and not self.use_prefix:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return self._biased_attention(query, key, value, bias, scale, kwargs.get("sliding_window"))

    def _key_positions(self, num_keys: int, device) -> torch.Tensor:
        """(B, T_k) key positions (= index), -1 for padding keys."""
        positions = torch.arange(num_keys, device=device)[None].expand(self.key_valid.shape[0], -1)
        return torch.where(self.key_valid[:, :num_keys].to(device), positions, torch.full_like(positions, -1))

    def _biased_attention(self, query, key, value, bias, scale, sliding_window):
        """SDPA with a float mask: causal + padding (+ sliding window) + ``bias`` (or None) on keys for query rows at
        positions >= bias_from. Keys are at positions ``0 .. T_k - 1``."""
        batch, num_q_heads, q, _ = query.shape
        num_kv_heads, num_keys = key.shape[1], key.shape[2]
        group = num_q_heads // num_kv_heads
        qpos = self.query_positions.to(query.device)  # (B, q)
        kpos = torch.arange(num_keys, device=query.device)
        allowed = (kpos[None, None, :] <= qpos[:, :, None]) & self.key_valid[:, None, :num_keys].to(query.device)
        if sliding_window is not None:
            allowed &= qpos[:, :, None] - kpos[None, None, :] < sliding_window
        allowed |= kpos[None, None, :] == qpos[:, :, None]  # every row keeps its own token: no empty softmax
        mask = torch.zeros(batch, 1, q, num_keys, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed[:, None], float("-inf"))
        if bias is not None:
            rows = (qpos >= self.bias_from.to(query.device)[:, None]).to(query.dtype)  # (B, q)
            expanded = bias.to(query.dtype).repeat_interleave(group, dim=1)  # (B, H_q, T_k)
            mask = mask + rows[:, None, :, None] * expanded[:, :, None, :]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous(), None
