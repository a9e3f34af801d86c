"""The ``gatekv train`` configuration: typed dataclasses, one docstring per field (CLI help and YAML comments).

Load with :func:`load_train_config` (YAML + ``a.b=c`` overrides). Unknown keys and wrong types are errors naming the
dotted key; cross-field rules are checked in ``__post_init__``. ``gatekv train --help-config`` lists every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from gatekv.config import load_config
from gatekv.heads.config import HeadsConfig  # the one heads config (adapters save its fields in HeadConfig)
from gatekv.settings import DEFAULT_SINKS, DEFAULT_WINDOW

__all__ = [
    "DataConfig",
    "HeadsConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "TargetConfig",
    "TrainConfig",
    "TrainerConfig",
    "load_train_config",
]


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


@dataclass
class ModelConfig:
    """The frozen base model."""

    name: str = "smollm2"
    """'smollm2' (the embedded SmolLM2-135M-Instruct GGUF), a Hub id or local path of a Llama/Mistral/Qwen2/Qwen3/
    Phi-3 causal LM, or 'tiny:<family>' (a tiny random model with a character tokenizer, for tests)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of a Hub model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the frozen model (float32 on CPU; bfloat16 on GPU)."""

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("name must not be empty")


@dataclass
class LoraConfig:
    """Optional LoRA on the backbone (peft), for the Attention-Gate SFT recipe; with the distill and lm targets."""

    enabled: bool = False
    """Train LoRA adapters on the backbone together with the heads."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Backbone module names that get LoRA (Phi-3: qkv_proj, o_proj)."""

    def __post_init__(self):
        _positive("lora", r=self.r, alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ValueError("target_modules must not be empty when LoRA is enabled")


@dataclass
class TargetConfig:
    """What the heads learn."""

    kind: Literal["cis", "distill", "teacher", "lm"] = "cis"
    """cis: regress Locret's causal importance score (max future pre-softmax logit over response queries and the GQA
    group); distill: KL to the frozen model with soft gate masks on prompt keys + an eviction-rate hinge; teacher:
    regress (and rank) the scores a registered scorer gives the prompt tokens (``teacher``: kvzip = the KVzap recipe);
    lm: Attention-Gate's own recipe: cross-entropy of the response tokens under the gates' soft masks on prompt keys
    + the eviction-rate hinge, usually with ``lora.enabled`` (the paper's SFT setting)."""
    teacher: Optional[str] = None
    """teacher: name of the registered scorer whose scores are the labels (kvzip, snapkv, expected_attention, ...)."""
    teacher_options: dict[str, Any] = field(default_factory=dict)
    """teacher: keyword options of that scorer (e.g. kvzip: {chunk_size: 2048}; snapkv: {window: 64})."""
    teacher_query: bool = False
    """teacher: query-aware labels: the sample's response tokens are the scorer's observation queries (SnapKV
    query-aware); false = the scorer sees the prompt alone (KVzip is query-agnostic: it refuses true)."""
    teacher_transform: Literal["log", "none"] = "log"
    """teacher: regress log(max(score, teacher_floor)) (KVzap regresses log KVzip scores) or the raw score."""
    teacher_floor: float = 1e-6
    """teacher: smallest score before the log (scores of attention-weight scorers lie in [0, 1])."""
    smooth_l1_beta: float = 1.0
    """cis / teacher: beta of the SmoothL1 loss."""
    smoothness: float = 0.0025
    """cis / teacher: weight of the smoothness term sum over layers of MSE(s[:, :-1], s[:, 1:])."""
    rank_weight: float = 0.0
    """cis / teacher: weight of the listwise ranking term KL(softmax(label / t) || softmax(score / t)) per layer and
    head over the prompt tokens outside the protected ``sinks`` and recent ``window`` (0 = Locret's loss alone)."""
    rank_temperature: float = 1.0
    """cis / teacher: t of the ranking term (CIS labels are pre-softmax logits and log teacher scores log-weights, so
    t = 1 ranks like attention would)."""
    topk_fraction: float = 0.1
    """Fraction of prompt tokens whose predicted vs. target top-k overlap is reported (0.1 = top 10%)."""
    eviction_target: float = 0.5
    """distill / lm: fraction of prompt tokens the gates should evict (reached after eviction_ramp_steps)."""
    eviction_ramp_steps: int = 100
    """distill / lm: steps over which the eviction target ramps linearly from 0 to eviction_target."""
    eviction_weight: float = 1.0
    """distill / lm: weight of the one-sided hinge max(0, target - eviction rate)."""
    mask: Literal["soft", "gumbel", "ste"] = "gumbel"
    """distill / lm: how keep probabilities enter attention: soft (log sigmoid(logit / tau)), gumbel (logistic noise
    added during training) or ste (hard 0 / -inf forward, soft gradient)."""
    temperature: float = 0.5
    """distill / lm: tau of the soft / gumbel mask."""
    gates: bool = True
    """lm: false = no gate masks at all (the gates stay untrained, the hinge is off): LoRA fine-tuning alone on the
    same data, the baseline of the Attention-Gate comparison (needs lora.enabled)."""
    sinks: int = DEFAULT_SINKS
    """First prompt tokens the inference session protects: distill never masks them; the cis ranking term leaves
    them out."""
    window: int = DEFAULT_WINDOW
    """Last prompt tokens the inference session protects (its recent window): distill never masks them; the cis
    ranking term leaves them out."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Optional LoRA on the backbone (distill and lm)."""

    def summary(self) -> dict:
        """The settings that define this objective (what a model card should say the heads were trained for)."""
        if self.kind in ("cis", "teacher"):
            out = {"kind": self.kind, "smooth_l1_beta": self.smooth_l1_beta, "smoothness": self.smoothness}
            if self.kind == "teacher":
                out.update(teacher=self.teacher, teacher_options=dict(self.teacher_options),
                           teacher_query=self.teacher_query, teacher_transform=self.teacher_transform)
                if self.teacher_transform == "log":
                    out["teacher_floor"] = self.teacher_floor
            if self.rank_weight > 0:
                out.update(rank_weight=self.rank_weight, rank_temperature=self.rank_temperature,
                           rank_excludes={"sinks": self.sinks, "window": self.window})
            return out
        out = {"kind": self.kind, "eviction_target": self.eviction_target, "eviction_weight": self.eviction_weight,
               "mask": self.mask, "temperature": self.temperature, "sinks": self.sinks, "window": self.window,
               "lora": self.lora.enabled}
        if self.kind == "lm" and not self.gates:
            out = {"kind": "lm", "gates": False, "lora": self.lora.enabled}
        return out

    def _check_teacher(self) -> None:
        """The teacher fields: a registered scorer that accepts the options (built once here to check)."""
        if self.kind != "teacher":
            changed = [name for name, value in (("teacher", self.teacher), ("teacher_options", self.teacher_options),
                                                ("teacher_query", self.teacher_query)) if value]
            if changed:
                raise ValueError(f"target.{changed[0]} applies to kind 'teacher' only, got kind {self.kind!r}")
            return
        from gatekv.scorers import available_scorers, get_scorer

        if not self.teacher:
            raise ValueError(f"target.teacher: kind 'teacher' needs a scorer name (one of {', '.join(available_scorers())})")
        if self.teacher not in available_scorers():
            raise ValueError(f"target.teacher: unknown scorer {self.teacher!r}; available: {', '.join(available_scorers())}")
        try:
            scorer = get_scorer(self.teacher, **self.teacher_options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"target.teacher_options: {error}") from None
        if self.teacher_query and scorer.replays:
            raise ValueError(f"target.teacher_query: {self.teacher!r} is query-agnostic (it replays the prompt); set it false")
        if not 0 < self.teacher_floor < 1:
            raise ValueError(f"target.teacher_floor must be in (0, 1), got {self.teacher_floor!r}")

    def __post_init__(self):
        _positive("target", smooth_l1_beta=self.smooth_l1_beta, temperature=self.temperature,
                  rank_temperature=self.rank_temperature)
        if self.smoothness < 0:
            raise ValueError(f"smoothness must be >= 0, got {self.smoothness}")
        if self.rank_weight < 0:
            raise ValueError(f"target.rank_weight must be >= 0, got {self.rank_weight}")
        if self.rank_weight > 0 and self.kind not in ("cis", "teacher"):
            raise ValueError(f"target.rank_weight applies to kinds 'cis' and 'teacher' only, got kind {self.kind!r}")
        self._check_teacher()
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if not 0 <= self.eviction_target < 1:
            raise ValueError(f"eviction_target must be in [0, 1), got {self.eviction_target}")
        if self.eviction_ramp_steps < 0 or self.eviction_weight < 0 or self.sinks < 0 or self.window < 0:
            raise ValueError("eviction_ramp_steps, eviction_weight, sinks and window must be >= 0")
        if self.lora.enabled and self.kind not in ("distill", "lm"):
            raise ValueError("lora.enabled needs kind: distill or lm (with cis the backbone only produces labels)")
        if not self.gates and (self.kind != "lm" or not self.lora.enabled):
            raise ValueError("target.gates: false is the LoRA-only baseline: it needs kind: lm and lora.enabled: true")


@dataclass
class DataConfig:
    """Training data: a local file/directory or a Hub dataset, chat-formatted and split into prompt / response."""

    path: Optional[str] = None
    """Local .json/.jsonl/.parquet file or a directory of them (exactly one of path / hub_id)."""
    hub_id: Optional[str] = None
    """Hub dataset id, e.g. Yukang/LongAlpaca-12k (needs network or the Hub cache)."""
    hub_config: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Dataset split to read."""
    format: Literal["auto", "sharegpt", "alpaca", "plain"] = "auto"
    """auto (from the columns), sharegpt (messages/conversations), alpaca (instruction/input/output) or plain (text)."""
    text_column: str = "text"
    """plain format: the column holding the text."""
    prompt_split: Literal["last_paragraph", "first_user_turn"] = "last_paragraph"
    """Where the prompt (context to evict) ends in a chat sample: last_paragraph = before the last blank line of
    the first user message (the question after it is a future query); first_user_turn = after the whole message."""
    plain_prompt_fraction: float = 0.75
    """plain format: the first fraction of tokens is the prompt, the rest the response."""
    max_length: int = 2048
    """Longest sample in tokens (prompt + response)."""
    overlong: Literal["truncate", "skip"] = "truncate"
    """Samples above max_length: truncate (keep the first max_length tokens) or skip; both are counted in the log."""
    min_response_tokens: int = 1
    """Samples with fewer response tokens (after truncation) are skipped and counted."""
    max_samples: Optional[int] = None
    """Use at most this many samples (after skipping), for quick runs."""
    val_fraction: float = 0.1
    """Fraction of samples held out for validation (0 = no validation)."""
    val_max_samples: Optional[int] = 32
    """At most this many validation samples."""
    batch_size: int = 1
    """Samples per step; batches hold samples of similar length (right padding)."""
    feature_cache: Optional[str] = None
    """cis only: directory caching each sample's frozen-model features and labels after its first forward, so later
    epochs run only the heads (bf16 features: ~57 MB per 1K prompt tokens for SmolLM2 retaining heads)."""
    feature_cache_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of cached features (labels are always float32)."""

    def __post_init__(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("exactly one of path and hub_id must be set")
        if not 0 < self.plain_prompt_fraction < 1:
            raise ValueError(f"plain_prompt_fraction must be in (0, 1), got {self.plain_prompt_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.min_response_tokens < 1:
            raise ValueError(f"min_response_tokens must be >= 1, got {self.min_response_tokens}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _positive("data", max_samples=self.max_samples, val_max_samples=self.val_max_samples, batch_size=self.batch_size)


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters only, with warmup then decay."""

    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to min_lr_ratio * lr at max_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    lora_lr: Optional[float] = None
    """Learning rate of the backbone's LoRA weights (target.lora), null = lr. The gates of the lm / distill recipes
    train at ~1e-2 (Adam moves their logits by ~lr per step), far above what LoRA on the backbone tolerates."""
    recency_lr: Optional[float] = None
    """Learning rate of the heads' recency table (heads.recency_buckets), null = 20 x lr. Adam moves a weight by
    about its lr per step, so at the heads' lr the table would shift by ~0.2 over a run, while the labels' recency
    trend spans several units; it follows the same warmup and schedule."""
    grad_clip: Optional[float] = 0.5
    """Gradient clipping threshold (null = off)."""
    grad_clip_algorithm: Literal["value", "norm"] = "value"
    """Clip each gradient element (value, Locret) or the global norm (norm; DeepSpeed only supports norm)."""

    def __post_init__(self):
        _positive("optim", lr=self.lr, grad_clip=self.grad_clip, recency_lr=self.recency_lr, lora_lr=self.lora_lr)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings."""

    max_steps: int = 300
    """Optimizer steps to train."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Device kind."""
    devices: Union[int, str] = 1
    """Devices per node (an int, or 'auto')."""
    num_nodes: int = 1
    """Nodes (multi-node runs: see train/launch_multi_node.sh)."""
    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    """auto on CPU / one GPU; ddp; deepspeed (GPU only: Lightning's DeepSpeed strategy refuses CPU)."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON (train/ds_zero2.json, ds_zero3.json, ds_zero3_offload.json); needed with strategy deepspeed."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    """Lightning precision (32-true on CPUs without bf16 units; bf16-mixed on GPU)."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer step."""
    log_every_n_steps: int = 10
    """Steps between logged training metrics."""
    val_every_n_steps: Optional[int] = 50
    """Steps between validations (null = only at the end)."""
    checkpoint_every_n_steps: int = 50
    """Steps between checkpoints (written atomically; only trainable weights + optimizer + step)."""
    threads: Optional[int] = None
    """torch CPU threads (null = torch's default)."""
    progress_bar: bool = True
    """Show a progress bar."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (CPU runs are deterministic regardless)."""

    def __post_init__(self):
        _positive("trainer", max_steps=self.max_steps, num_nodes=self.num_nodes,
                  accumulate_grad_batches=self.accumulate_grad_batches, log_every_n_steps=self.log_every_n_steps,
                  val_every_n_steps=self.val_every_n_steps, checkpoint_every_n_steps=self.checkpoint_every_n_steps,
                  threads=self.threads)
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ValueError(f"devices must be an int or 'auto', got {self.devices!r}")
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.strategy == "deepspeed" and not self.deepspeed_config:
            raise ValueError("deepspeed_config is required with strategy: deepspeed (e.g. train/ds_zero2.json)")
        if self.strategy == "deepspeed" and self.accelerator == "cpu":
            raise ValueError(
                "strategy: deepspeed needs a GPU (Lightning's DeepSpeed strategy refuses CPU); use strategy: auto on CPU"
            )


@dataclass
class OutputConfig:
    """Where the run writes, and how it resumes."""

    dir: str = "runs/train"
    """Run directory: config.yaml, checkpoints/, logs/, adapter/, summary.json."""
    resume: str = "auto"
    """auto (continue from the newest checkpoint in dir if any), never (refuse a dir that has checkpoints), or the
    path of a checkpoint."""
    loggers: list[Literal["csv", "tensorboard"]] = field(default_factory=lambda: ["csv"])
    """Metric loggers (tensorboard needs the tensorboard package)."""
    export_adapter: bool = True
    """Write the trained heads to dir/adapter at the end (safetensors + JSON config)."""

    def __post_init__(self):
        if not self.dir.strip():
            raise ValueError("dir must not be empty")
        if not self.resume.strip():
            raise ValueError("resume must be 'auto', 'never' or a checkpoint path")


@dataclass
class TrainConfig:
    """A complete ``gatekv train`` configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen base model."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """The trainable modules."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """What they learn."""
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/train.jsonl"))
    """Training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Run directory and resume."""
    seed: int = 0
    """Seed of the data order, the head initialisation and the per-step reseed."""
    init_from: Optional[str] = None
    """An adapter directory whose heads' weights start this run (fine-tuning a trained adapter, e.g. on your own
    documents) instead of a random initialisation; its head type, hyper-parameters and base-model fingerprint must
    be this run's. Resuming from a checkpoint restores the checkpoint's weights as usual. LoRA weights are not
    carried over."""

    def __post_init__(self):
        _check_finite(self)
        if isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")
        if self.data.feature_cache is not None and self.target.kind in ("distill", "lm"):
            raise ValueError(f"data.feature_cache works with target.kind cis or teacher ({self.target.kind} needs the "
                             "live backbone)")
        if self.heads.recency_buckets > 0 and self.target.kind in ("distill", "lm"):
            raise ValueError(f"heads.recency_buckets works with target.kind cis or teacher ({self.target.kind} trains "
                             "per-layer gates)")
        if self.trainer.strategy == "deepspeed" and self.optim.grad_clip is not None and self.optim.grad_clip_algorithm == "value":
            raise ValueError("optim.grad_clip_algorithm: DeepSpeed clips by norm only; set it to 'norm' (or grad_clip: null)")


def _check_finite(config, path: str = "") -> None:
    """``ValueError`` naming the first float field (at any depth) that is NaN or infinite (``optim.lr=.inf``)."""
    import dataclasses
    import math

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{key} must be a finite number, got {value!r}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from YAML + ``a.b=c`` overrides; relative paths in it stay relative to the CWD."""
    return load_config(TrainConfig, path, overrides)


def check_files(config: TrainConfig) -> None:
    """Checks that touch the file system (run by ``validate`` and ``train``): the data path exists and the
    DeepSpeed config parses. ``ValueError`` naming the key and the file."""
    if config.data.path is not None:
        _check_data_path(Path(config.data.path))
    if config.trainer.deepspeed_config is not None:
        load_deepspeed_config(config.trainer.deepspeed_config)
    resume = config.output.resume
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise ValueError(f"output.resume: checkpoint {resume} does not exist")
    if config.init_from is not None and not (Path(config.init_from) / "gatekv_config.json").is_file():
        raise ValueError(f"init_from: {config.init_from} is not an adapter directory (no gatekv_config.json)")


def _check_data_path(path: Path) -> None:
    """``ValueError`` naming ``data.path`` if it is missing, a directory without data files, or an empty file."""
    if not path.exists():
        raise ValueError(f"data.path: {path} does not exist (train/prepare_data.py writes one)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl", ".parquet"))
        if not files:
            raise ValueError(f"data.path: directory {path} holds no .json/.jsonl/.parquet files")
    else:
        files = [path]
    for file in files:
        if file.stat().st_size == 0 or (file.suffix != ".parquet" and not file.read_bytes()[:1 << 20].strip()):
            raise ValueError(f"data.path: {file} is empty")


def load_deepspeed_config(path: str | Path) -> dict:
    """The DeepSpeed JSON as a dict; ``ValueError`` naming ``trainer.deepspeed_config`` if missing or unparsable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trainer.deepspeed_config: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"trainer.deepspeed_config: {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"trainer.deepspeed_config: {path} must hold a JSON object")
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"trainer.deepspeed_config: {path}: zero_optimization.stage must be 0, 1, 2 or 3")
    # Lightning sets these from the gatekv config; DeepSpeed's own optimizer would bypass the head-only parameters
    owned = {
        "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
        "optimizer": "optim.* (gatekv builds AdamW over the trainable parameters only)",
        "scheduler": "optim.schedule",
    }
    for key, instead in owned.items():
        if key in data:
            raise ValueError(f"trainer.deepspeed_config: {path}: remove {key!r}; it is set by {instead}")
    return data


def deepspeed_offloads_optimizer(data: dict) -> bool:
    """True if a DeepSpeed config offloads the optimizer to the CPU (then DeepSpeedCPUAdam is required)."""
    offload = data.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")
