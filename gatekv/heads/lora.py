"""LoRA weights in peft's on-disk format, applied by merging inside a context manager (exactly undone on exit).

The one definition of the LoRA weight names: ``base_model.model.<module path>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), as peft writes them; :func:`lora_from_tensors` reads them (adapters and training
checkpoints alike), :meth:`LoraWeights.save` writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from gatekv.io import atomic_write_text, read_json, read_safetensors, warn_pickles, write_safetensors

__all__ = ["LORA_WEIGHT_NAME", "LoraWeights", "lora_from_tensors", "lora_scale", "lora_weight_name"]

LORA_WEIGHT_NAME = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
"""A LoRA tensor name in peft's format: group 1 the module path in the causal LM, group 2 ``A`` or ``B``."""


def lora_weight_name(module: str, part: str) -> str:
    """peft's tensor name of ``module``'s LoRA ``part`` (``A`` or ``B``)."""
    return f"base_model.model.{module}.lora_{part}.weight"


def lora_scale(peft_config: dict) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of a peft ``adapter_config.json`` document."""
    r, alpha = peft_config["r"], peft_config["lora_alpha"]
    return alpha / (r**0.5 if peft_config.get("use_rslora") else r)


def lora_from_tensors(tensors: dict[str, torch.Tensor], peft_config: dict, where: str = "LoRA weights") -> "LoraWeights":
    """:class:`LoraWeights` from peft-named tensors (``ValueError`` naming ``where`` for a foreign or unpaired one)."""
    r = peft_config["r"]
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_WEIGHT_NAME.fullmatch(key)
        if match is None:
            raise ValueError(f"{where}: unexpected tensor {key!r} (plain LoRA A/B weights only)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    out = {}
    for module, found in sorted(pairs.items()):
        if set(found) != {"A", "B"}:
            raise ValueError(f"{where}: {module} lacks lora_{'B' if 'A' in found else 'A'}.weight")
        a, b = found["A"], found["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise ValueError(
                f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                f"(r={r}, in) and (out, r={r})"
            )
        out[module] = (a, b)
    if not out:
        raise ValueError(f"{where}: holds no LoRA weights")
    return LoraWeights(out, float(lora_scale(peft_config)), peft_config)


@dataclasses.dataclass
class LoraWeights:
    """Plain LoRA weights in peft's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

    pairs: ``{module path in the causal LM ("model.layers.0.self_attn.q_proj"): (A (r, in), B (out, r))}``
    scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)
    peft_config: the ``adapter_config.json`` document, written back unchanged
    """

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    peft_config: dict

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LoraWeights":
        """Read and validate a peft LoRA directory (``ValueError`` naming the file and the problem)."""
        directory = Path(directory)
        config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"LoRA file missing: {path}")
        warn_pickles(directory)
        config = read_json(config_path)
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
        for key in ("use_dora", "fan_in_fan_out"):
            if config.get(key):
                raise ValueError(f"{config_path}: {key}=true is not supported (plain LoRA only)")
        if config.get("bias", "none") != "none":
            raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported (only 'none')")
        r, alpha = config.get("r"), config.get("lora_alpha")
        for name, value in (("r", r), ("lora_alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{config_path}: {name} must be a positive number, got {value!r}")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"{config_path}: rank_pattern/alpha_pattern are not supported")
        return lora_from_tensors(read_safetensors(weights_path), config, str(weights_path))

    def save(self, directory: str | os.PathLike) -> None:
        """Write peft's format into ``directory`` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (a, b) in self.pairs.items():
            tensors[lora_weight_name(module, "A")] = a.detach().cpu().contiguous()
            tensors[lora_weight_name(module, "B")] = b.detach().cpu().contiguous()
        write_safetensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
        atomic_write_text(directory / "adapter_config.json", json.dumps(self.peft_config, indent=2, sort_keys=True) + "\n")

    def check_model(self, model) -> None:
        """``ValueError`` unless every LoRA module exists in ``model`` as a Linear of matching shape."""
        problems = []
        for module_path, (a, b) in self.pairs.items():
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                problems.append(f"{module_path}: not in the model")
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight is None:
                problems.append(f"{module_path}: is a {type(module).__name__}, not a Linear layer")
            elif tuple(weight.shape) != (b.shape[0], a.shape[1]):
                problems.append(f"{module_path}: weight {tuple(weight.shape)} vs LoRA {(b.shape[0], a.shape[1])}")
        if problems:
            raise ValueError("the LoRA weights do not fit the model: " + "; ".join(problems))

    @contextlib.contextmanager
    def applied(self, model):
        """Merge ``W += scale * B @ A`` into the model's Linear weights for the duration of the block; on exit the
        original weights are copied back bit for bit (even after an exception)."""
        self.check_model(model)
        saved = []
        try:
            with torch.no_grad():
                for module_path, (a, b) in self.pairs.items():
                    weight = model.get_submodule(module_path).weight
                    original = weight.detach().clone()
                    saved.append((weight, original))
                    delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * self.scale
                    weight.copy_((original.float() + delta).to(weight.dtype))
            yield model
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)
