"""Lightning pieces: the LightningModule around :class:`HeadObjective`, the data module, atomic checkpoint I/O and
the callbacks that record metrics, throughput and memory.

Frozen-backbone rules (../shared/notes/lightning-deepspeed.md): the backbone is ``requires_grad_(False)`` and in eval
mode (re-asserted at every batch); only trainable parameters reach the optimizer and the checkpoint
(``strict_loading = False``); ``torch.manual_seed(seed + global_step)`` before every step, so a resumed run draws the
same random numbers (Gumbel noise) as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from gatekv.training.config import TrainConfig
from gatekv.training.data import Sample, StatefulBatchLoader, _Collator, length_sorted_batches, tokens_in
from gatekv.training.objective import HeadObjective

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointOnSigterm",
    "CheckpointWriteError",
    "HeadDataModule",
    "HeadTrainingModule",
    "MetricsRecorder",
    "NonFiniteLoss",
    "lr_lambda",
]

_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


class NonFiniteLoss(RuntimeError):
    """The loss (or a trainable weight about to be checkpointed) is NaN or infinite: the run stops, and the checkpoint
    written before it stays the newest one."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); its temporary file was removed and the previous
    checkpoint kept."""


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str, min_ratio: float):
    """Multiplier of the peak lr at step s: linear warmup, then cosine / linear decay to ``min_ratio`` (or constant)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class HeadTrainingModule(L.LightningModule):
    """Trains ``objective.heads`` (and LoRA, if any) with the backbone frozen.

    objective: the :class:`HeadObjective`
    config:    the run's :class:`TrainConfig`
    meta:      identity of the run stored in every checkpoint and checked on resume (fingerprint, head config, target)
    """

    def __init__(self, objective: HeadObjective, config: TrainConfig, meta: dict):
        super().__init__()
        self.objective = objective
        self.config = config
        self.meta = meta
        self.strict_loading = False  # checkpoints hold only the trainable weights

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    # -- steps -----------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed(self.config.seed + self.global_step)
        self.objective.backbone.eval()  # never let the backbone's mode drift (dropout would change the labels)

    def training_step(self, batch, batch_idx):
        loss, metrics = self.objective(batch, step=self.global_step)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLoss(f"the training loss is {float(loss.detach())} at step {self.global_step}")
        self._log("train", loss, metrics, batch)
        self.last_step_metrics = {"train/loss": float(loss.detach())}
        self.last_step_metrics.update({f"train/{k}": float(v.float().nanmean()) for k, v in metrics.items() if v.numel()})
        return loss

    def validation_step(self, batch, batch_idx):
        loss, metrics = self.objective(batch, step=self.global_step)
        self._log("val", loss, metrics, batch)
        return loss

    def _log(self, stage: str, loss, metrics, batch) -> None:
        size = int(batch["lengths"].numel())
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=True, batch_size=size, on_step=on_step, on_epoch=not on_step,
                 sync_dist=not on_step)
        for name, values in metrics.items():
            value = values.float().nanmean() if values.numel() else values
            self.log(f"{stage}/{name}", value, prog_bar=name == "topk_overlap", batch_size=size, on_step=on_step,
                     on_epoch=not on_step, sync_dist=not on_step)

    def configure_optimizers(self):
        optim = self.config.optim
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        recency_lr = optim.recency_lr if optim.recency_lr is not None else 20 * optim.lr
        lora_lr = optim.lora_lr if optim.lora_lr is not None else optim.lr

        def group(n: str) -> str:
            return "recency" if n.endswith(".recency") else "lora" if ".lora_" in n else "heads"

        params = [{"params": [p for n, p in named if group(n) == "heads"], "lr": optim.lr}]
        for name, lr in (("recency", recency_lr), ("lora", lora_lr)):
            members = [p for n, p in named if group(n) == name]
            if members:
                params.append({"params": members, "lr": lr})
        if self._offloads_optimizer():  # ZeRO-Offload refuses torch optimizers: the same AdamW, DeepSpeed's CPU kernel
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        factor = lr_lambda(optim.warmup_steps, self.config.trainer.max_steps, optim.schedule, optim.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _offloads_optimizer(self) -> bool:
        trainer = self.config.trainer
        if trainer.strategy != "deepspeed":
            return False
        from gatekv.training.config import deepspeed_offloads_optimizer, load_deepspeed_config

        return deepspeed_offloads_optimizer(load_deepspeed_config(trainer.deepspeed_config))

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.trainable_names()
        state = checkpoint.get("state_dict")
        if state is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
            bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:  # never let a checkpoint of broken weights replace the last good one
                raise NonFiniteLoss(f"trainable weights {bad[:3]} hold NaN or infinite values at step {self.global_step}")
        checkpoint["gatekv"] = self.meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_meta(checkpoint.get("gatekv"), self.meta, "checkpoint")


def check_checkpoint_meta(saved: dict | None, current: dict, where: str) -> None:
    """``ValueError`` naming what differs between a checkpoint's run identity and this run's."""
    if saved is None:
        raise ValueError(f"{where} was not written by gatekv train (no 'gatekv' entry)")
    problems = []
    if saved.get("head_type") != current["head_type"]:
        problems.append(f"head type {saved.get('head_type')!r} (checkpoint) vs {current['head_type']!r} (config)")
    if saved.get("fingerprint") != current["fingerprint"]:
        old, new = saved.get("fingerprint") or {}, current["fingerprint"]
        fields = [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        problems.append("base model differs (" + "; ".join(fields) + ")")
    if saved.get("head_config") != current["head_config"] and saved.get("head_type") == current["head_type"]:
        old, new = saved.get("head_config") or {}, current["head_config"]
        fields = [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        problems.append("head dimensions differ (" + "; ".join(fields) + ")")
    if saved.get("target") != current["target"]:
        problems.append(f"target {saved.get('target')!r} (checkpoint) vs {current['target']!r} (config)")
    if problems:
        raise ValueError(f"{where} belongs to a different run: " + "; ".join(problems))


class HeadDataModule(L.LightningDataModule):
    """Tokenized samples -> a resumable length-sorted training loader and a fixed validation loader."""

    def __init__(self, train: list[Sample], val: list[Sample], batch_size: int, pad_id: int, seed: int):
        super().__init__()
        self.train_samples, self.val_samples = train, val
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world_size = self._rank()
        return StatefulBatchLoader(self.train_samples, self.batch_size, self.pad_id, self.seed,
                                   rank=rank, world_size=world_size)

    def val_dataloader(self):
        if not self.val_samples:
            return []
        rank, world_size = self._rank()
        batches = length_sorted_batches(self.val_samples, self.batch_size)
        if len(batches) >= world_size:  # every process runs the same number of batches (DDP forwards are collective)
            batches = batches[rank::world_size][: len(batches) // world_size]
        return DataLoader(batches, batch_size=None, collate_fn=_Collator(self.val_samples, self.pad_id), num_workers=0)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, fsyncs it, then renames it into place; then
    deletes older ``step-N.ckpt`` files beyond the newest ``keep`` (also those of an earlier, killed run).

    A failed write (disk full, I/O error) removes the temporary file, keeps every existing checkpoint and raises
    :class:`CheckpointWriteError` naming the path.
    """

    def __init__(self, keep: int = 1):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:
            tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(_write_failure(path, error)) from error
        self._prune(path)

    def _prune(self, newest: Path) -> None:
        steps = []
        for entry in newest.parent.iterdir():
            match = _STEP_FILE.match(entry.name)
            if match and entry.is_file():
                steps.append((int(match.group(1)), entry))
        for _, old in sorted(steps, reverse=True)[self.keep:]:
            if old != newest:
                old.unlink(missing_ok=True)


def _write_failure(path: Path, error: BaseException) -> str:
    """One line saying why writing checkpoint ``path`` failed (torch's zip writer reports ENOSPC as a RuntimeError
    ``[enforce fail at inline_container.cc] ... file write failed``)."""
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "file write failed" in str(error)
    previous = sorted((p for p in path.parent.glob("step-*.ckpt") if p != path), key=lambda p: p.name)
    kept = f"; the previous checkpoint {previous[-1].name} is kept" if previous else ""
    if full:
        return f"disk full at {path}: the checkpoint was not written{kept}"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else " ".join(str(error).split())
    return f"could not write checkpoint {path}: {reason}{kept}"


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what schedulers and Kubernetes send), write ``step-N.ckpt`` at the end of the current step, at the
    very point ``ModelCheckpoint`` writes its own, so that a rerun resumes exactly there; Lightning then stops the
    loop (``SIGTERMException``), which ``train()`` turns into a non-zero exit."""

    def __init__(self, checkpoint_dir: Path, every_n_steps: int):
        self.checkpoint_dir, self.every = Path(checkpoint_dir), every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.received_sigterm or step >= trainer.max_steps or step % self.every == 0:
            return  # not stopping, finishing anyway, or ModelCheckpoint writes this step itself
        trainer.save_checkpoint(self.checkpoint_dir / f"step-{step:06d}.ckpt", weights_only=False)  # full state


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsRecorder(L.Callback):
    """Appends one JSON line per logged step to ``path`` (train and val metrics, tokens/s, peak memory).

    Lines of steps a killed run had logged past its last checkpoint are superseded on resume (the reader keeps the
    last line per step and stage).
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every = Path(path), every_n_steps
        self._start = 0.0
        self.tokens = 0
        self.seconds = 0.0
        self._sums: dict[str, float] = {}
        self._count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.tokens += tokens_in(batch)
        for name, value in getattr(pl_module, "last_step_metrics", {}).items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == trainer.max_steps):
            # means over the steps since the previous record (a smoother curve than single steps)
            metrics = {k: v / max(self._count, 1) for k, v in self._sums.items()}
            self._sums, self._count = {}, 0
            self._write({"stage": "train", "step": step, **metrics,
                         "lr": trainer.optimizers[0].param_groups[0]["lr"],
                         "tokens_per_s": self.tokens / max(self.seconds, 1e-9), "peak_rss_mib": peak_rss_mib()})

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            self._write({"stage": "val", "step": trainer.global_step, **metrics})

    def _write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl, the last one per (stage, step), sorted by step (torn last lines are skipped)."""
    if not Path(path).is_file():
        return []
    latest: dict[tuple[str, int], dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[(record["stage"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["stage"]))
