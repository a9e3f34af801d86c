"""Model families gatekv supports, and capture of what scorers read (hidden states, pre-RoPE q/k/v).

All hooks are returned as handles and removed by the caller (``compress`` removes them in ``finally``).
"""

from __future__ import annotations

from dataclasses import dataclass

import functools
import inspect

import torch

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelSpec", "cache_kwarg", "capture_layer_inputs", "find_cache", "inspect_model",
           "output_cache"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3")


@dataclass
class ModelSpec:
    """Shape facts of a supported decoder-only model."""

    model_type: str
    attention_modules: list[torch.nn.Module]
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


@functools.cache
def _forward_takes_cache(forward_owner: type) -> bool:
    return "cache" in inspect.signature(forward_owner.forward).parameters


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a model's ``forward``/``generate`` takes the cache under: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is a deprecated alias) or ``past_key_values`` (earlier 5.x)."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def find_cache(kwargs: dict):
    """The cache passed in a forward's keyword arguments, under either name (None when there is none)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output):
    """The cache a forward/generate output returned (``output.cache``, or ``output.past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def inspect_model(model: torch.nn.Module) -> ModelSpec:
    """Validate that ``model`` is a supported causal LM and return its :class:`ModelSpec`.

    Raises ValueError naming the architecture (and the supported list) otherwise.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        name = type(model).__name__ if model_type is None else f"{type(model).__name__} (model_type={model_type!r})"
        raise ValueError(f"unsupported architecture {name}; gatekv supports model types {list(SUPPORTED_MODEL_TYPES)}")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (expected model.model.layers)")
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__}: its attention implementation cannot be switched "
            "(the modeling code does not use transformers' AttentionInterface)"
        )
    modules = [layer.self_attn for layer in layers]
    head_dim = getattr(modules[0], "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSpec(
        model_type=model_type,
        attention_modules=modules,
        num_layers=len(modules),
        num_q_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
    )


def _heads_first(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*d) or (B, T, H, d) -> (B, H, T, d)."""
    if x.dim() == 3:
        x = x.reshape(*x.shape[:2], -1, head_dim)
    return x.transpose(1, 2)


def capture_layer_inputs(
    spec: ModelSpec, layer_idx: int, sink: dict, hidden: bool, pre_rope: bool
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register hooks on one attention module that write into ``sink`` during its forward:

    ``hidden_states`` (B, q, D) when ``hidden``; ``pre_rope_queries`` (B, H_q, q, d), ``pre_rope_keys``
    (B, H_kv, q, d), ``pre_rope_values`` (B, H_kv, q, d) when ``pre_rope`` — after Qwen3's q/k-norm, split from
    Phi-3's fused qkv. Returns the hook handles.
    """
    module = spec.attention_modules[layer_idx]
    d = spec.head_dim
    handles = []
    if hidden:

        def grab_hidden(mod, args, kwargs):
            sink["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handles.append(module.register_forward_pre_hook(grab_hidden, with_kwargs=True))
    if not pre_rope:
        return handles

    def store(name):
        def hook(mod, args, output):
            sink[name] = _heads_first(output, d)

        return hook

    if spec.model_type == "phi3":
        q_width, kv_width = spec.num_q_heads * d, spec.num_kv_heads * d

        def split_qkv(mod, args, output):
            sink["pre_rope_queries"] = _heads_first(output[..., :q_width], d)
            sink["pre_rope_keys"] = _heads_first(output[..., q_width : q_width + kv_width], d)
            sink["pre_rope_values"] = _heads_first(output[..., q_width + kv_width :], d)

        handles.append(module.qkv_proj.register_forward_hook(split_qkv))
        return handles
    if spec.model_type == "qwen3":  # q/k-norm runs before RoPE: capture after it
        handles.append(module.q_norm.register_forward_hook(store("pre_rope_queries")))
        handles.append(module.k_norm.register_forward_hook(store("pre_rope_keys")))
    else:
        handles.append(module.q_proj.register_forward_hook(store("pre_rope_queries")))
        handles.append(module.k_proj.register_forward_hook(store("pre_rope_keys")))
    handles.append(module.v_proj.register_forward_hook(store("pre_rope_values")))
    return handles
