"""Adapters: trained heads (and optional LoRA weights, ``gatekv.heads.lora``) as a directory that the Hugging Face Hub can host.

Layout (exactly these files; ``lora/`` only when LoRA was trained with the heads)::

    gatekv_config.json           format + version, head type and dims, base model id/revision + shape fingerprint,
                                 target, training summary, evaluation table, library version
    adapter_model.safetensors    the heads' weights only
    README.md                    model card: YAML metadata (library_name: gatekv, base_model, tags, license) + text
    lora/adapter_config.json     peft's own LoRA format (``PeftModel.from_pretrained(base, "<dir>/lora")`` loads it)
    lora/adapter_model.safetensors

Typical use::

    adapter = Adapter.from_pretrained("user/smollm2-retaining-heads")      # local path, then HF cache, then Hub
    heads = adapter.heads_for(model)                                          # refuses a different base model
    adapter.save_pretrained("out/")  ;  adapter.push_to_hub("user/name")

Security: weights are read only from safetensors (a ``.bin``/``.pt``/``.pkl`` file in the directory is ignored and a
warning says so); everything is validated (format version, types, tensor names, shapes, dtypes) before any weight is
put anywhere, so a bad adapter never leaves a half-loaded model behind. The Hub side is ``huggingface_hub``
(``ModelHubMixin``, ``snapshot_download``, ``upload_folder``).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, snapshot_download

from gatekv.heads.base import HeadsScorer, head_class
from gatekv.heads.config import HeadConfig
from gatekv.heads.lora import LoraWeights
from gatekv.version import __version__
from gatekv.io import atomic_write_text, hub_failure, read_json, read_safetensors, warn_pickles, write_safetensors
from gatekv.models import SMOLLM2_HUB_ID, ModelFingerprint

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT",
    "ADAPTER_FORMAT_VERSION",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "load_adapter",
    "save_adapter",
]

ADAPTER_CONFIG = "gatekv_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CARD = "README.md"
LORA_DIR = "lora"
ADAPTER_FORMAT = "gatekv-adapter"
ADAPTER_FORMAT_VERSION = 1
_HUB_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD, f"{LORA_DIR}/*"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def heads_dtype(value, field: str = "heads_dtype") -> torch.dtype | None:
    """``None``, a ``torch`` float dtype or its name (``float32``, ``bfloat16``, ``float16``) -> the dtype the heads
    compute in (None: as stored); ``ValueError`` naming ``field`` otherwise."""
    if value is None or value in _DTYPES.values():
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"{field} must be one of {sorted(_DTYPES)}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------------------------------------------


class Adapter(
    ModelHubMixin,
    library_name="gatekv",
    tags=["gatekv", "kv-cache-compression", "long-context"],
    repo_url="https://github.com/gatekv/gatekv",
):
    """Trained heads + what is known about them, savable to / loadable from a directory or the Hub.

    heads:         the trained :class:`~gatekv.heads.HeadsScorer`
    base_model:    what the heads were trained on: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), a Hub id or path
    base_revision: the base model's revision (commit, tag) if known
    target:        the training target (``cis``, ``distill``)
    training:      training summary (steps, samples, final validation metrics), JSON-serialisable
    evaluation:    ``{"markdown": table, "command": how it was made, ...}`` shown on the model card, or None
    lora:          LoRA weights trained with the heads (they change the base model's outputs), or None
    license:       the card's license
    """

    def __init__(
        self,
        heads,
        base_model: str | None = None,
        base_revision: str | None = None,
        target: str | None = None,
        training: dict | None = None,
        evaluation: dict | None = None,
        lora: LoraWeights | None = None,
        license: str = "apache-2.0",
    ):
        if not isinstance(heads, HeadsScorer):
            raise TypeError(f"heads must be a gatekv HeadsScorer, got {type(heads).__name__}")
        self.heads = heads
        self.base_model = base_model
        self.base_revision = base_revision
        self.target = target
        self.training = dict(training or {})
        self.evaluation = evaluation
        self.lora = lora
        self.license = license
        # gatekv_config.json is our config; the mixin's own config.json (built from init arguments) would be a
        # fourth, redundant file in every saved or uploaded folder.
        self._hub_mixin_config = None

    @property
    def config(self) -> HeadConfig:
        return self.heads.config

    @property
    def fingerprint(self) -> ModelFingerprint:
        return self.heads.config.fingerprint

    @property
    def base_model_hub_id(self) -> str | None:
        """The base model as a Hub id for the card's ``base_model`` (None for tiny test models and paths)."""
        if self.base_model in (None, ""):
            return None
        if self.base_model == "smollm2":
            return SMOLLM2_HUB_ID
        if self.base_model.startswith("tiny:") or os.path.isabs(self.base_model) or self.base_model.startswith("."):
            return None
        return self.base_model

    def describe(self) -> str:
        fp = self.fingerprint
        params = sum(p.numel() for p in self.heads.parameters())
        lora = f", LoRA on {len(self.lora.pairs)} modules" if self.lora else ""
        return (
            f"{self.config.type} adapter for {self.base_model or 'an unnamed base model'} ({fp.model_type}, "
            f"{fp.num_layers} layers x {fp.num_kv_heads} KV heads), {params:,} parameters{lora}"
        )

    def __repr__(self) -> str:
        return f"Adapter({self.describe()})"

    # -- using it ----------------------------------------------------------------------------------------------------
    def heads_for(self, model, allow_mismatch: bool = False, dtype=None):
        """The heads, checked against ``model``'s fingerprint and moved to its device (eval mode, no grad).

        allow_mismatch: skip the fingerprint check (the shapes of the layers must still fit)
        dtype:          compute the heads in this dtype (name or ``torch.dtype``; None: as stored). Another dtype than
                        the stored one gives a converted copy, the adapter's own heads stay as they are. ``bfloat16``
                        makes a gate's projection and attention several times cheaper on CPUs with AMX / AVX512-BF16
                        (scores then differ from float32's by bf16 rounding: measure quality in the dtype you run)
        """
        dtype = heads_dtype(dtype, "dtype")
        model_print = ModelFingerprint.from_model(model)
        if not allow_mismatch:
            self.fingerprint.check_matches(model_print)
        # compress() checks the fingerprint again; this marks the explicit override for exactly this model
        self.heads.accepted_fingerprint = model_print
        device = next(model.parameters()).device
        heads = self.heads
        if dtype is not None and dtype != next(heads.parameters()).dtype:
            heads = copy.deepcopy(heads).to(dtype)
        return heads.to(device).eval().requires_grad_(False)

    # -- saving ------------------------------------------------------------------------------------------------------
    def config_document(self) -> dict:
        """The ``gatekv_config.json`` document."""
        weights_dtype = next(self.heads.parameters()).dtype
        return {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "library_version": __version__,
            "head": self.config.to_dict(),
            "weights_dtype": str(weights_dtype).removeprefix("torch."),
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "target": self.target,
            "training": self.training,
            "evaluation": self.evaluation,
            "lora": None if self.lora is None else {"path": LORA_DIR, "modules": len(self.lora.pairs)},
            "license": self.license,
            "inference": {"pool_kernel": self.heads.pool_kernel, "recency": self.heads.use_recency},
        }

    def _save_pretrained(self, save_directory: Path) -> None:
        """ModelHubMixin hook: write the adapter files (each atomically) into ``save_directory``."""
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise ValueError(f"adapter directory {save_directory} is a file")
        save_directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(save_directory)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.heads.state_dict().items()}
        write_safetensors(save_directory / ADAPTER_WEIGHTS, tensors, {"format": "pt", "gatekv_head_type": self.config.type})
        if self.lora is not None:
            self.lora.save(save_directory / LORA_DIR)
        elif (save_directory / LORA_DIR).exists():
            raise ValueError(f"{save_directory / LORA_DIR} exists but this adapter has no LoRA weights; use an empty directory")
        atomic_write_text(save_directory / MODEL_CARD, str(self.generate_model_card()))
        # the config last: a directory with a config is a complete adapter
        atomic_write_text(save_directory / ADAPTER_CONFIG, json.dumps(self.config_document(), indent=2, sort_keys=True) + "\n")

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The model card: YAML metadata (library_name, base_model, tags, license) + usage, training, evaluation."""
        fp = self.fingerprint
        tags = ["gatekv", "kv-cache-compression", "long-context", self.config.type.replace("_", "-")]
        if self.lora is not None:
            tags.append("lora")
        data = ModelCardData(library_name="gatekv", base_model=self.base_model_hub_id, tags=tags, license=self.license)
        loader = f'"{self.base_model}"' if self.base_model else "model"
        lines = [
            f"# gatekv {self.config.type.replace('_', ' ')} adapter"
            + (f" for {self.base_model_hub_id}" if self.base_model_hub_id else ""),
            "",
            "Small trained modules that score which KV-cache entries to keep, for "
            "[gatekv](https://github.com/gatekv/gatekv). At inference the scores drive gatekv's budget allocators "
            "(uniform, Ada-KV, PyramidKV) and the physically compacted cache, like any training-free scorer.",
            "",
            f"- module: `{self.config.type}` ({sum(p.numel() for p in self.heads.parameters()):,} parameters, "
            f"one per layer)",
            f"- base model: `{self.base_model or 'unknown'}`" + (f" @ `{self.base_revision}`" if self.base_revision else ""),
            f"- shapes: {fp.model_type}, {fp.num_layers} layers, {fp.num_q_heads} query / {fp.num_kv_heads} KV heads, "
            f"head dim {fp.head_dim}",
            f"- training target: `{self.target or 'unknown'}`",
            "",
            "## Use",
            "",
            "```python",
            "from gatekv import GateKV",
            "",
            f"kv = GateKV.from_pretrained({loader}, adapter=\"<this repo or directory>\", budget=0.1, allocator=\"adakv\")",
            "print(kv.answer(long_document, question, query_aware=False).text)",
            "```",
            "",
        ]
        if self.lora is not None:
            lines += [
                "**This adapter also carries LoRA weights (`lora/`, peft format) trained with the modules: loading it "
                "applies them, so the base model's outputs change (inside gatekv calls only; the model is restored "
                "afterwards).**",
                "",
            ]
        if self.training:
            lines += ["## Training", ""]
            lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in sorted(self.training.items())]
            lines.append("")
        if self.evaluation and self.evaluation.get("markdown"):
            lines += ["## Evaluation", ""]
            if self.evaluation.get("description"):
                lines += [self.evaluation["description"], ""]
            lines += [self.evaluation["markdown"].rstrip(), ""]
            if self.evaluation.get("command"):
                lines += [f"Command: `{self.evaluation['command']}`", ""]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))

    # -- loading -----------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs,
    ) -> "Adapter":
        """An adapter from a local directory, else the Hugging Face cache, else the Hub (``snapshot_download``;
        works offline with ``HF_HUB_OFFLINE=1`` when the revision is cached). Only the adapter files are fetched."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, **_) -> "Adapter":
        path = Path(model_id).expanduser()
        if path.is_dir():
            return cls.load_directory(path)
        if path.exists() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
            raise FileNotFoundError(f"adapter directory not found: {model_id}")
        try:
            folder = snapshot_download(
                repo_id=model_id,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=_HUB_FILES,
            )
        except Exception as error:  # offline and not cached, unknown repo or revision, network: name the id
            raise FileNotFoundError(hub_failure(f"adapter {model_id!r}", error)) from None
        return cls.load_directory(folder)

    @classmethod
    def load_directory(cls, directory: str | os.PathLike) -> "Adapter":
        """Read and validate an adapter directory; nothing is built until every check passed."""
        directory = Path(directory)
        config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"adapter file missing: {path}")
        warn_pickles(directory)
        document = read_json(config_path)
        if document.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{config_path} is not a gatekv adapter config (format must be {ADAPTER_FORMAT!r})")
        version = document.get("format_version")
        if version != ADAPTER_FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: unknown format_version {version!r}; this gatekv reads version {ADAPTER_FORMAT_VERSION} "
                "(a newer adapter needs a newer gatekv)"
            )
        _check_types(
            config_path,
            document,
            {
                "head": dict,
                "weights_dtype": str,
                "base_model": (str, type(None)),
                "base_revision": (str, type(None)),
                "target": (str, type(None)),
                "training": (dict, type(None)),
                "evaluation": (dict, type(None)),
                "lora": (dict, type(None)),
                "license": (str, type(None)),
                "inference": (dict, type(None)),
            },
        )
        try:
            config = HeadConfig.from_dict(document["head"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: head: {error}") from None
        dtype = _DTYPES.get(document["weights_dtype"])
        if dtype is None:
            raise ValueError(f"{config_path}: weights_dtype {document['weights_dtype']!r} is not one of {sorted(_DTYPES)}")
        tensors = read_safetensors(weights_path)
        heads = head_class(config.type)(config).to(dtype)
        expected = heads.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not fit {config.type} heads: missing {missing}, unexpected {unexpected}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{weights_path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
                )
            if tensor.dtype != expected[name].dtype:
                raise ValueError(f"{weights_path}: {name} is {tensor.dtype}, the config says {dtype}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{weights_path}: {name} holds NaN or infinite values")
        lora = None
        if document.get("lora") is not None:
            lora = LoraWeights.load(_inside(directory, document["lora"].get("path", LORA_DIR), config_path, "lora.path"))
        elif (directory / LORA_DIR).exists():
            warnings.warn(f"{directory / LORA_DIR} is ignored: {config_path} does not declare LoRA weights", stacklevel=2)
        heads.load_state_dict(tensors)
        heads.eval().requires_grad_(False)
        try:
            heads.set_pooling((document.get("inference") or {}).get("pool_kernel", 1))
            heads.set_recency((document.get("inference") or {}).get("recency", True))
        except ValueError as error:
            raise ValueError(f"{config_path}: inference.{error}") from None
        return cls(
            heads,
            base_model=document.get("base_model"),
            base_revision=document.get("base_revision"),
            target=document.get("target"),
            training=document.get("training"),
            evaluation=document.get("evaluation"),
            lora=lora,
            license=document.get("license") or "apache-2.0",
        )


# ----------------------------------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------------------------------


def _inside(directory: Path, relative, config_path: Path, key: str) -> Path:
    """``directory / relative`` if ``relative`` is a relative path that stays inside ``directory`` (saved artifacts
    only reference their own files); ``ValueError`` naming ``key`` otherwise."""
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{config_path}: {key} must be a relative path inside the adapter directory, got {relative!r}")
    if os.path.isabs(relative) or Path(relative).expanduser() != Path(relative):
        raise ValueError(f"{config_path}: {key} {relative!r} is absolute; it must name a directory inside {directory}")
    root = directory.resolve()
    target = (directory / relative).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"{config_path}: {key} {relative!r} points outside the adapter directory {directory}")
    return directory / relative


def _remove_stale_temp_files(directory: Path) -> None:
    """Temporary files that a killed save left in ``directory`` (:func:`gatekv.io.atomic_write` names them
    ``.<file>.<random>.tmp``)."""
    names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD, "adapter_config.json")
    for folder in (directory, directory / LORA_DIR):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_file() and entry.name.endswith(".tmp") and entry.name.startswith(tuple(f".{n}." for n in names)):
                entry.unlink(missing_ok=True)


def _check_types(path: Path, document: dict, types: dict[str, Any]) -> None:
    for key, expected in types.items():
        if key not in document:
            if type(None) in (expected if isinstance(expected, tuple) else (expected,)):
                continue
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(document[key], expected):
            names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise ValueError(f"{path}: {key} must be {names}, got {type(document[key]).__name__} {document[key]!r}")


# ----------------------------------------------------------------------------------------------------------------------
# shortcuts
# ----------------------------------------------------------------------------------------------------------------------


def save_adapter(heads: HeadsScorer, directory: str | os.PathLike, **info) -> Path:
    """Write ``heads`` as an adapter directory (:class:`Adapter` ``(heads, **info).save_pretrained(directory)``).

    info: :class:`Adapter` fields (base_model, base_revision, target, training, evaluation, lora, license)
    """
    Adapter(heads, **info).save_pretrained(directory)
    return Path(directory)


def load_adapter(source: str | os.PathLike, model=None, device=None, allow_mismatch: bool = False,
                 dtype=None) -> HeadsScorer:
    """Heads from an adapter (local directory, Hugging Face cache or Hub id), in eval mode.

    model:          if given, its fingerprint must match the adapter's (``ValueError`` naming each differing field,
                    unless ``allow_mismatch``) and the heads are moved to its device
    device:         where to put the heads (default: the model's device, else CPU)
    dtype:          the heads' compute dtype (see :meth:`Adapter.heads_for`; None: as stored)
    LoRA weights in the adapter are not applied here: use :class:`gatekv.GateKV` (or ``Adapter.lora.applied``).
    """
    dtype = heads_dtype(dtype, "dtype")
    adapter = Adapter.from_pretrained(source)
    if model is None:
        heads = adapter.heads if dtype is None else adapter.heads.to(dtype)
    else:
        heads = adapter.heads_for(model, allow_mismatch=allow_mismatch, dtype=dtype)
    if device is not None:
        heads.to(device)
    return heads
