"""Offline shape check of a recipe's base model: built from its ``config.json`` alone on the meta device (no weights,
no download), inspected as ``gatekv train`` would inspect it, with the recipe's heads sized for it.

``gatekv validate`` runs it when ``model.name`` is a local directory holding a ``config.json``; configs/models/ ships
the configs of the GPU recipes' models, so a recipe for an 8B model is checked on a laptop::

    gatekv validate configs/train/llama-3.1-8b-instruct-retaining-head.yaml --no-device-check \\
        --set model.name=configs/models/llama-3.1-8b-instruct
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gatekv.training.config import TrainConfig

__all__ = ["ModelShapes", "check_model_shapes"]

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelShapes:
    """What the check found: the base model's shapes and size, and the heads built for it."""

    model_type: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_position_embeddings: int
    fused_qkv: bool
    """Phi-3: one qkv_proj whose output is split into q, k, v (widths checked)."""
    base_parameters: int
    """Parameters of the base model (embeddings and LM head included)."""
    base_bytes: int
    """Its weights in ``model.dtype``."""
    head_type: str
    head_input_width: int
    """Features per token a head layer reads (retaining head: (H_q + 2 H_kv) d)."""
    head_parameters: int
    """Trainable parameters of the heads, all layers."""

    def summary(self) -> str:
        qkv = "fused qkv" if self.fused_qkv else "q/k/v projections"
        return (f"model {self.model_type} (config only, meta device): {self.num_layers} layers, {self.num_q_heads} query / "
                f"{self.num_kv_heads} KV heads, head_dim {self.head_dim}, {qkv}; {self.base_parameters:,} parameters "
                f"({self.base_bytes / 1e9:.1f} GB); {self.head_type} heads: {self.head_parameters:,} parameters "
                f"(input width {self.head_input_width}, {self.head_parameters * 4 / 1e6:.0f} MB in float32)")


def check_model_shapes(config: TrainConfig) -> ModelShapes:
    """Build ``config.model.name`` (a directory with a config.json) on the meta device, run gatekv's model
    inspection and the projections the head inputs are captured from, and build the configured heads on it.
    ``ValueError`` naming the key for an unsupported family, mismatched projections or a ``data.max_length``
    beyond the model's positions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gatekv.heads import build_heads
    from gatekv.models import SUPPORTED_MODEL_TYPES, inspect_model

    path = Path(config.model.name)
    if not (path / "config.json").is_file():
        raise ValueError(f"model.name: {path} is not a directory holding a config.json")
    try:
        base_config = AutoConfig.from_pretrained(str(path))
    except Exception as error:
        raise ValueError(f"model.name: could not read {path / 'config.json'}: {error}") from None
    if getattr(base_config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model.name: {path} is a {getattr(base_config, 'model_type', '?')!r} model; gatekv heads "
                         f"support {list(SUPPORTED_MODEL_TYPES)}")
    dtype = getattr(torch, config.model.dtype)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype, attn_implementation="sdpa")
        try:
            spec = inspect_model(model)
        except ValueError as error:
            raise ValueError(f"model.name {str(path)!r}: {error}") from None
        _check_projections(spec)
        heads = build_heads(config.heads.type, model, **config.heads.options())
    positions = int(getattr(base_config, "max_position_embeddings", 0) or 0)
    if positions and config.data.max_length > positions:
        raise ValueError(f"data.max_length {config.data.max_length} > the model's max_position_embeddings {positions}")
    base_parameters = sum(p.numel() for p in model.parameters())
    return ModelShapes(
        model_type=spec.model_type,
        num_layers=spec.num_layers,
        num_q_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_size=base_config.hidden_size,
        max_position_embeddings=positions,
        fused_qkv=spec.model_type == "phi3",
        base_parameters=base_parameters,
        base_bytes=base_parameters * _BYTES[config.model.dtype],
        head_type=heads.config.type,
        head_input_width=heads.config.input_width,
        head_parameters=sum(p.numel() for p in heads.parameters()),
    )


def _check_projections(spec) -> None:
    """``ValueError`` unless every layer has the projections ``gatekv.models.capture_layer_inputs`` hooks, with
    widths H_q d, H_kv d, H_kv d (Phi-3: one qkv_proj of (H_q + 2 H_kv) d; Qwen3: q_norm / k_norm too)."""
    d, hq, hkv = spec.head_dim, spec.num_q_heads, spec.num_kv_heads
    if spec.model_type == "phi3":
        expected = {"qkv_proj": (hq + 2 * hkv) * d}
    else:
        expected = {"q_proj": hq * d, "k_proj": hkv * d, "v_proj": hkv * d}
    for layer, module in enumerate(spec.attention_modules):
        for name, width in expected.items():
            out = getattr(getattr(module, name, None), "out_features", None)
            if out != width:
                raise ValueError(f"model.name: layer {layer} {name} has output width {out}, expected {width} "
                                 f"(H_q {hq}, H_kv {hkv}, head_dim {d})")
        if spec.model_type == "qwen3" and not (hasattr(module, "q_norm") and hasattr(module, "k_norm")):
            raise ValueError(f"model.name: layer {layer} has no q_norm / k_norm (Qwen3 heads read q/k after them)")
