"""File helpers for saved artifacts: atomic writes, safetensors and JSON reads that name the file, Hub messages.

Atomic writes go to a temporary file in the target's directory, flushed to disk, then renamed over the target: a
reader (or a killed run) never sees a half-written file, either the old one or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["PICKLE_SUFFIXES", "atomic_write", "atomic_write_text", "hub_failure", "read_json", "read_safetensors",
           "warn_pickles", "write_safetensors"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
"""Files gatekv never reads weights from (unpickling runs code)."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` to produce the file, then fsync it and rename it to ``path`` (parents created).

    suffix: of the temporary name (some writers pick the format from it, e.g. ``.png`` for matplotlib)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; the result gets the usual permissions
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def hub_failure(what: str, error: BaseException) -> str:
    """One line for a failed Hub lookup (``LocalEntryNotFoundError`` offline, unknown repo, network)."""
    name = type(error).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if "LocalEntryNotFound" in name or offline:
        why = "not a local directory and not in the Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if offline else "")
    elif "RepositoryNotFound" in name:
        why = "no such repository on the Hub (or it is private: log in with `hf auth login`)"
    elif "RevisionNotFound" in name:
        why = "that revision does not exist on the Hub"
    else:
        why = f"could not be fetched from the Hub ({name})"
    return f"{what}: {why}"


def warn_pickles(directory: Path) -> None:
    """Warn about pickle files in ``directory``: they are ignored, never loaded."""
    ignored = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if ignored:
        warnings.warn(
            f"ignoring {ignored} in {directory}: gatekv reads weights from safetensors only, never from pickle files",
            stacklevel=3,
        )


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (``ValueError`` naming the file if it is not valid JSON or not an object)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(document).__name__}")
    return document


def read_safetensors(path: Path) -> dict:
    """``{name: tensor}`` from a safetensors file (``ValueError`` naming the file if it is truncated or corrupt)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} could not be read as safetensors (truncated or corrupt?): {error}") from None


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write ``{name: tensor}`` (contiguous CPU tensors) as safetensors, atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
