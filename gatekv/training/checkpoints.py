"""The files of a training run's checkpoints: ``checkpoints/step-N.ckpt`` (a Lightning file, or a DeepSpeed
directory with a ``latest`` marker), the temporary files of interrupted writes, and reading one back.

One definition for ``gatekv train`` (resume) and ``gatekv export`` (newest checkpoint of a run directory).
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import torch

__all__ = [
    "STEP_FILE",
    "TEMP_FILE",
    "deepspeed_model_states",
    "find_resume_checkpoint",
    "read_checkpoint_file",
    "remove_stale_temp_files",
    "step_checkpoints",
]

log = logging.getLogger("gatekv.training")
STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
"""A checkpoint's name (group 1: the global step)."""
TEMP_FILE = re.compile(r"^\.step-\d+\.ckpt\.tmp-\d+$")
"""A checkpoint write in progress (or one a killed run left behind): ``.step-N.ckpt.tmp-PID``."""


def deepspeed_model_states(directory: Path) -> list[Path]:
    """The model-states files of a DeepSpeed checkpoint directory (they hold the client state, ``gatekv`` meta)."""
    return sorted(directory.glob("*/mp_rank_00_model_states.pt")) + sorted(
        directory.glob("*/zero_pp_rank_0_mp_rank_00_model_states.pt"))


def remove_stale_temp_files(checkpoint_dir: Path) -> None:
    """Temporary files of checkpoint writes that a killed or failed run left behind (``.step-N.ckpt.tmp-PID``)."""
    if not checkpoint_dir.is_dir():
        return
    for entry in checkpoint_dir.iterdir():
        if TEMP_FILE.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            log.info("removed %s (left by an interrupted checkpoint write)", entry.name)


def step_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete-looking ``step-N.ckpt`` in ``checkpoint_dir``, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for entry in checkpoint_dir.iterdir():
        match = STEP_FILE.match(entry.name)
        if match and (entry.is_file() or (entry / "latest").is_file()):
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def find_resume_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest ``step-N.ckpt`` (a file, or a DeepSpeed directory holding its ``latest`` marker); whether it is
    readable is checked when it is opened (``gatekv train``'s resume falls back to an older one)."""
    found = step_checkpoints(checkpoint_dir)
    return found[0][1] if found else None


def read_checkpoint_file(path: Path, where: str = "checkpoint") -> dict:
    """The dict stored in a Lightning checkpoint file (``torch.load(weights_only=True)``); ``ValueError`` naming
    ``where`` and the file if it is not a checkpoint at all, or a truncated / corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{where}: {path} is not a file")
    looks_like_one = bool(STEP_FILE.match(path.name)) or path.suffix in (".ckpt", ".pt", ".pth")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a cut-off one has no central directory
        if looks_like_one:
            raise ValueError(f"{where}: {path} is truncated or corrupt (not a complete checkpoint file)")
        raise ValueError(f"{where}: {path} is not a gatekv training checkpoint (expected a step-N.ckpt file from "
                         "gatekv train, a DeepSpeed checkpoint directory or a run directory)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
        raise ValueError(f"{where}: {path} is truncated or corrupt ({reason[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{where}: {path} is not a gatekv training checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint
