"""Tiny deterministic models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**_COMMON)
    if family == "qwen2":
        return Qwen2Config(**_COMMON)
    if family == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16)
    if family == "mistral":
        return MistralConfig(**_COMMON, sliding_window=64)
    if family == "phi3":
        return Phi3Config(**{**_COMMON, "num_key_value_heads": 1}, partial_rotary_factor=0.5)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa"):
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.eval()
    # larger random weights than the default init: attention is then far from uniform, so eviction matters
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(8.0)
    model.generation_config.pad_token_id = 0
    return model


def random_batch(batch: int, length: int, pad: list[int] | None = None, seed: int = 0, vocab: int = 128):
    """Left-padded token batch: ids (B, length) and a 2-D attention mask; row b has ``pad[b]`` pads."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pad or [0] * batch):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask
