"""Models: the families gatekv supports, the one model loader, tiny test models, the shape fingerprint, and
capture of what scorers read (hidden states, pre-RoPE q/k/v).

``load_base_model`` takes ``smollm2`` (the embedded SmolLM2-135M-Instruct, ``gatekv.smollm2``), ``tiny:<family>`` — a
tiny random Llama/Qwen2/Qwen3/Mistral/Phi-3 (2 layers, hidden 64, vocab 128) with a character-level ChatML
tokenizer, so that tests and CI configs run end to end without downloads — or a Hub id / local path.

All hooks are returned as handles and removed by the caller (``compress`` removes them in ``finally``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gatekv.io import hub_failure

__all__ = [
    "SMOLLM2_HUB_ID",
    "SUPPORTED_MODEL_TYPES",
    "TINY_FAMILIES",
    "ModelFingerprint",
    "ModelSpec",
    "cache_kwarg",
    "capture_layer_inputs",
    "char_tokenizer",
    "check_device",
    "find_cache",
    "inspect_model",
    "load_base_model",
    "output_cache",
    "tiny_config",
    "tiny_model",
]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the embedded default model (``base_model: smollm2`` in an adapter means this model)."""


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
    spec: ModelSpec, layer_idx: int, sink: dict, hidden: bool, pre_rope: bool,
    active: Callable[[], bool] | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register hooks on one attention module that write into ``sink`` during its forward:

    ``hidden_states`` (B, q, D) when ``hidden``; ``pre_rope_queries`` (B, H_q, q, d), ``pre_rope_keys``
    (B, H_kv, q, d), ``pre_rope_values`` (B, H_kv, q, d) when ``pre_rope`` — after Qwen3's q/k-norm, split from
    Phi-3's fused qkv. ``active``: when given, the hooks write only while it returns True (a compression session's
    decode steps that score nothing skip the copies). Returns the hook handles.
    """
    module = spec.attention_modules[layer_idx]
    d = spec.head_dim
    handles = []

    def gated(hook):
        if active is None:
            return hook

        def run(*args):
            if active():
                hook(*args)

        return run

    if hidden:

        @gated
        def grab_hidden(mod, args, kwargs):
            sink["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handles.append(module.register_forward_pre_hook(grab_hidden, with_kwargs=True))
    if not pre_rope:
        return handles

    def store(name):
        @gated
        def hook(mod, args, output):
            sink[name] = _heads_first(output, d)

        return hook

    if spec.model_type == "phi3":
        q_width, kv_width = spec.num_q_heads * d, spec.num_kv_heads * d

        @gated
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


# ----------------------------------------------------------------------------------------------------------------------
# the shape fingerprint
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFingerprint:
    """Shapes and RoPE settings of a base model: heads trained on one model only fit models with the same print."""

    model_type: str
    """transformers ``model_type`` (llama, mistral, phi3, qwen2, qwen3)."""
    num_layers: int
    """Decoder layers."""
    num_q_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (GQA)."""
    head_dim: int
    """Width of one attention head."""
    hidden_size: int
    """Width of the residual stream."""
    rope: str
    """RoPE settings as sorted JSON (theta, scaling type, partial rotary factor)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = str if f.name in ("model_type", "rope") else int
            if isinstance(value, bool) or not isinstance(value, want):
                raise ValueError(f"fingerprint.{f.name} must be {want.__name__}, got {type(value).__name__} {value!r}")
            if want is int and value < 1:
                raise ValueError(f"fingerprint.{f.name} must be >= 1, got {value}")

    @classmethod
    def from_model(cls, model) -> "ModelFingerprint":
        """Fingerprint of a transformers causal LM (``ValueError`` if its family is not supported)."""
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported base model {type(model).__name__} (model_type={model_type!r}); "
                f"gatekv heads support {list(SUPPORTED_MODEL_TYPES)}"
            )
        num_q_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
        rope: dict[str, Any] = {}
        parameters = getattr(config, "rope_parameters", None)
        if isinstance(parameters, dict):
            rope.update({k: v for k, v in parameters.items() if isinstance(v, (int, float, str, bool)) or v is None})
        elif getattr(config, "rope_theta", None) is not None:
            rope["rope_theta"] = config.rope_theta
        factor = getattr(config, "partial_rotary_factor", None)
        if factor is not None:
            rope["partial_rotary_factor"] = factor
        return cls(
            model_type=model_type,
            num_layers=config.num_hidden_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_q_heads,
            head_dim=int(head_dim),
            hidden_size=config.hidden_size,
            rope=json.dumps(rope, sort_keys=True),
        )

    def differences(self, other: "ModelFingerprint") -> list[str]:
        """``["num_layers: 30 (adapter) vs 2 (model)", ...]`` for every field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} (adapter) vs {getattr(other, f.name)!r} (model)"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def check_matches(self, other: "ModelFingerprint", what: str = "adapter") -> None:
        """Raise ``ValueError`` naming every differing field if ``other`` (the model) does not match."""
        diffs = self.differences(other)
        if diffs:
            raise ValueError(f"the {what} was made for a different base model: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def check_device(device, what: str = "device") -> torch.device:
    """``torch.device(device)``, or ``ValueError`` naming ``what`` if it is not a device name or not available here
    (``cuda`` without CUDA, an index past the last GPU)."""
    try:
        parsed = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{what}: {device!r} is not a device (use cpu, cuda or cuda:N): {error}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {device!r} but torch sees no CUDA device here (this torch "
                             + ("has no CUDA support" if torch.version.cuda is None else "found no GPU") + "); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {device!r} but there are only {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type not in ("cpu", "mps", "xpu", "meta"):
        raise ValueError(f"{what}: {device!r} is not supported (use cpu or cuda[:N])")
    return parsed


def load_base_model(name_or_path: str, revision: str | None = None, dtype: torch.dtype | None = None, device=None,
                    attn_implementation: str | None = None):
    """``(model, tokenizer)``: ``"smollm2"`` (or its Hub id when offline/not cached) = the embedded SmolLM2;
    ``"tiny:<family>"`` = a tiny random test model; anything else goes to transformers' ``from_pretrained`` (local
    path, HF cache, Hub), in eval mode. ``ValueError`` naming the model if it cannot be found or loaded, or the device if absent.

    attn_implementation: passed to ``from_pretrained`` (default: transformers' choice)
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"base model: expected a name, Hub id or path, got {name_or_path!r}")
    dtype = dtype or torch.float32
    device = check_device(device)
    if name_or_path == "smollm2" or (name_or_path == SMOLLM2_HUB_ID and _prefer_embedded(SMOLLM2_HUB_ID, revision)):
        from gatekv.smollm2 import load_smollm2

        return load_smollm2(dtype=dtype, device=device)
    if name_or_path.startswith("tiny:"):  # tiny random test models (2 layers, character tokenizer)
        return tiny_model(name_or_path.split(":", 1)[1]).to(device=device, dtype=dtype).eval(), char_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as error:  # transformers: not a model directory, not cached (offline), not on the Hub
        local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(name_or_path)
        if not isinstance(error, OSError) and not local:
            raise
        if local:
            raise ValueError(f"base model {name_or_path!r}: no loadable model there ({' '.join(str(error).split())[:200]})") from None
        raise ValueError(hub_failure(f"base model {name_or_path!r}", error.__cause__ or error)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval().requires_grad_(False), tokenizer


def _prefer_embedded(hub_id: str, revision: str | None) -> bool:
    """True when the Hub copy is not usable here (offline and not in the cache)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    return not isinstance(cached, str)


# ----------------------------------------------------------------------------------------------------------------------
# tiny test models
# ----------------------------------------------------------------------------------------------------------------------


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII, newline, tab; ids < 128) with a ChatML template.

    ids: 0 ``<pad>``, 1 ``<|im_start|>``, 2 ``<|im_end|>``, 3 ``<unk>``, then one id per character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without spaces
    backend.add_special_tokens(specials[:3])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def tiny_config(family: str, max_position_embeddings: int = 4096):
    """The config of a tiny random causal LM of ``family`` (2 layers, hidden 64, 4 query / 2 KV heads, vocab 128;
    Qwen3 with q/k-norm, Mistral with a 64-token sliding window, Phi-3 with fused qkv, 1 KV head and half rotary)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),
        "mistral": lambda: MistralConfig(**common, sliding_window=64),
        "phi3": lambda: Phi3Config(**{**common, "num_key_value_heads": 1}, partial_rotary_factor=0.5),
    }
    if family not in configs:
        raise ValueError(f"model.name: unknown tiny family {family!r}; valid: {list(configs)}")
    return configs[family]()


def tiny_model(family: str, seed: int = 0, max_position_embeddings: int = 4096, attn_implementation: str = "sdpa"):
    """A tiny random causal LM of ``family`` (:func:`tiny_config`), eval mode; q/k projections scaled up so that
    attention is far from uniform (eviction then matters)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, max_position_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                    param.mul_(8.0)
    model.generation_config.pad_token_id = 0
    return model.eval()
