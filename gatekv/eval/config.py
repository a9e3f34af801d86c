"""``gatekv eval`` configuration: methods x allocators x budgets x tasks x lengths x modes (typed, strict YAML)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gatekv.config import load_config
from gatekv.settings import DEFAULT_CHUNK_SIZE, DEFAULT_SINKS, DEFAULT_WINDOW, CompressionConfig

__all__ = ["EvalConfig", "MethodConfig", "SuiteConfig", "load_eval_config"]


ADAPTER_OPTIONS = ("pool_kernel", "recency", "rank_mix", "heads_dtype")
"""The ``options`` a method with an ``adapter`` takes."""


@dataclass
class MethodConfig:
    """One scorer to evaluate: a training-free scorer, a trained adapter, or the full cache."""

    name: str
    """Label in the tables and the plot."""
    scorer: str | None = None
    """Training-free scorer name (``gatekv.available_scorers()``), ``full`` for the uncompressed cache, or ``oracle``
    (real-text tasks only: the CIS label of the target itself, a bound for trained heads; ``gatekv.eval.oracle``)."""
    adapter: str | None = None
    """Trained adapter: a directory or a Hub id (instead of ``scorer``)."""
    allocators: list[str] = field(default_factory=lambda: ["uniform"])
    """Allocators to run this scorer with (ignored for the full cache)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the scorer (e.g. ``kernel_size: 7``); for an adapter (:data:`ADAPTER_OPTIONS`):
    ``pool_kernel``, ``recency`` (false: no learned recency bias), ``rank_mix`` (label -> weight, ``adapter``
    for its heads and training-free scorer names for the others: the heads' ranking within each head blended with those scorers', e.g.
    ``{adapter: 0.75, defensivekv: 0.25}``) and ``heads_dtype`` (``bfloat16``: the heads compute in bf16)."""
    allocator_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments per allocator name, e.g. ``{global: {floor: 0.2}, fairkv: {tp: 3}}``."""
    merge: str | None = None
    """Merger applied at every eviction (``gatekv.merge``: ems, d2o, kvmerger, razor), or none."""
    merge_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the merger."""

    def __post_init__(self):
        if not self.name or "|" in self.name:
            raise ValueError(f"name must be a non-empty label without '|', got {self.name!r}")
        if (self.scorer is None) == (self.adapter is None):
            raise ValueError(f"method {self.name!r}: set exactly one of scorer or adapter")
        if not self.allocators:
            raise ValueError(f"method {self.name!r}: allocators must not be empty")
        if self.scorer == "oracle" and self.options:
            raise ValueError(f"method {self.name!r}: the oracle takes no options, got {sorted(self.options)}")
        if self.scorer is not None and self.scorer not in ("full", "oracle"):
            from gatekv.scorers import available_scorers

            if self.scorer not in available_scorers():
                raise ValueError(f"method {self.name!r}: unknown scorer {self.scorer!r}; valid: full, oracle, "
                                 f"{', '.join(available_scorers())}")
            if self.options:  # built once here so a misspelt option fails at load time, naming the method
                from gatekv.scorers import get_scorer

                try:
                    get_scorer(self.scorer, **self.options)
                except ValueError as error:
                    raise ValueError(f"method {self.name!r}: options: {error}") from None
        if self.adapter is not None:
            self._check_adapter_options()
        from gatekv.allocators import available_allocators

        for allocator in self.allocators:
            if allocator not in available_allocators():
                raise ValueError(f"method {self.name!r}: unknown allocator {allocator!r}; valid: {available_allocators()}")
        extra = sorted(set(self.allocator_options) - set(self.allocators))
        if extra:
            raise ValueError(f"method {self.name!r}: allocator_options for {extra}, which are not in allocators")
        if self.merge is not None:
            from gatekv.merge import available_mergers

            if self.merge not in available_mergers():
                raise ValueError(f"method {self.name!r}: unknown merge {self.merge!r}; valid: {available_mergers()}")

    def _check_adapter_options(self) -> None:
        unknown = sorted(set(self.options) - set(ADAPTER_OPTIONS))
        if unknown:
            raise ValueError(f"method {self.name!r}: options {unknown} do not apply to an adapter (valid: "
                             f"{', '.join(ADAPTER_OPTIONS)})")
        if "recency" in self.options and not isinstance(self.options["recency"], bool):
            raise ValueError(f"method {self.name!r}: recency must be true or false, got {self.options['recency']!r}")
        if "heads_dtype" in self.options:
            from gatekv.heads.adapter import heads_dtype

            try:
                heads_dtype(self.options["heads_dtype"])
            except ValueError as error:
                raise ValueError(f"method {self.name!r}: {error}") from None
        mix = self.options.get("rank_mix")
        if mix is None:
            return
        from gatekv.scorers import available_scorers
        from gatekv.scorers.rank_mix import check_mix_options, split_mix_spec

        try:
            mix, options = split_mix_spec(mix)
        except ValueError as error:
            raise ValueError(f"method {self.name!r}: options.{error}") from None
        if "adapter" not in mix or len(mix) < 2:
            raise ValueError(f"method {self.name!r}: options.rank_mix must weigh 'adapter' and at least one scorer, "
                             f"got {mix!r}")
        for label in mix:
            if label != "adapter" and label not in available_scorers():
                raise ValueError(f"method {self.name!r}: options.rank_mix: unknown scorer {label!r}; valid: adapter, "
                                 f"{', '.join(available_scorers())}")
        try:
            check_mix_options(mix, **options)
        except ValueError as error:
            raise ValueError(f"method {self.name!r}: options.{error}") from None

    @property
    def is_full(self) -> bool:
        return self.scorer == "full"

    @property
    def is_oracle(self) -> bool:
        return self.scorer == "oracle"


@dataclass
class SuiteConfig:
    """A public suite loaded through ``datasets`` (see ``gatekv.eval.loaders``); it is one more task column."""

    name: str
    """Task label."""
    kind: Literal["ruler", "longbench", "infinitebench"]
    """Record layout."""
    source: str
    """Local file/directory (json, jsonl, parquet, csv) or a Hub id."""
    split: str = "test"
    """Split of a Hub dataset."""
    config_name: str | None = None
    """Hub dataset configuration (e.g. LongBench's ``hotpotqa``)."""
    max_samples: int | None = None
    """At most this many records (default: ``num_samples``)."""


@dataclass
class EvalConfig:
    """An evaluation run."""

    methods: list[MethodConfig] = field(default_factory=list)
    """Scorers to evaluate (each with its allocators)."""
    model: str = "smollm2"
    """Base model: ``smollm2`` (embedded), a Hub id or a path."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype (float32 on CPUs)."""
    device: str = "cpu"
    """cpu or cuda[:N]."""
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.5])
    """Kept fraction of the context per KV head."""
    tasks: list[str] = field(default_factory=lambda: ["niah_single"])
    """Generated tasks (``gatekv.eval.TASKS``, scored by accuracy) and real-text tasks (``lm``, ``recall``: scored by
    NLL and KL, see ``gatekv.eval.realtext``)."""
    suites: list[SuiteConfig] = field(default_factory=list)
    """Public suites (extra task columns; their lengths are their own)."""
    lengths: list[int] = field(default_factory=lambda: [2048])
    """Context lengths in tokens of the generated tasks."""
    modes: list[Literal["query_agnostic", "query_aware"]] = field(default_factory=lambda: ["query_agnostic"])
    """``query_agnostic``: the context is compressed before the question is seen; ``query_aware``: with it."""
    num_samples: int = 50
    """Samples per (task, length)."""
    seed_base: int = 0
    """Sample seeds are seed_base .. seed_base + num_samples - 1 (below 1,000,000: the training data's seeds)."""
    haystack_files: list[str] = field(default_factory=list)
    """Local text files for the haystack (default: the held-out part of ``pydoc_data.topics``)."""
    corpus: str | list[str] = "gnu-info"
    """Documents of the real-text tasks: a corpus of ``gatekv.corpus`` (``gnu-info``: the evaluation corpus, held out
    from training, which uses ``python-docs``) or text file / directory paths."""
    continuation_tokens: int = 128
    """``lm``: scored tokens after the context (the next N tokens of the same document)."""
    recall_span: int = 96
    """``recall``: scored tokens of the verbatim span."""
    recall_cue: int = 8
    """``recall``: tokens of the span's start given after the instruction (the cue; not scored)."""
    recall_region: float = 0.8
    """``recall``: the span lies in this leading fraction of the context (and outside the recent window)."""
    window: int = DEFAULT_WINDOW
    """Recent tokens always kept (and the observation window unless ``observe_window``)."""
    sinks: int = DEFAULT_SINKS
    """First tokens always kept."""
    observe_window: int | None = None
    """The last prompt tokens whose attention scorers and allocators observe; None = ``window``
    (:attr:`gatekv.settings.CompressionConfig.observe_window`)."""
    prefill: Literal["one_shot", "chunked"] = "one_shot"
    """Prefill mode of the compressed runs."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Chunk of the chunked prefill."""
    max_new_tokens: int = 32
    """Generated tokens per answer at most (greedy)."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    output: str = "runs/eval"
    """Directory for results.json, results.md and accuracy_vs_budget.png."""
    resume: bool = True
    """Continue from an existing results.json (finished cells are skipped)."""

    def __post_init__(self):
        from gatekv.eval.realtext import REALTEXT_TASKS
        from gatekv.eval.tasks import TASKS
        from gatekv.training.synthetic import TRAIN_SEED_BASE

        if not self.methods:
            raise ValueError("methods must not be empty")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        for task in self.tasks:
            if task not in TASKS + REALTEXT_TASKS:
                raise ValueError(f"tasks: unknown task {task!r}; valid: {list(TASKS + REALTEXT_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: duplicates in {self.tasks}")
        for name, value in (("continuation_tokens", self.continuation_tokens), ("recall_span", self.recall_span),
                            ("recall_cue", self.recall_cue)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.recall_region <= 1:
            raise ValueError(f"recall_region must be in (0, 1], got {self.recall_region}")
        if not self.corpus:
            raise ValueError("corpus must name a corpus or list text files")
        if self.realtext_tasks:
            from gatekv.corpus import CORPORA

            if isinstance(self.corpus, str) and self.corpus in CORPORA and CORPORA[self.corpus].role == "training":
                warnings.warn(f"corpus {self.corpus!r} is a training corpus: real-text results on it are not held out",
                              stacklevel=2)
        if not self.tasks and not self.suites:
            raise ValueError("tasks and suites are both empty: nothing to evaluate")
        oracles = [m.name for m in self.methods if m.is_oracle]
        if oracles and not self.realtext_tasks:
            raise ValueError(f"methods {oracles}: the oracle scores the real-text tasks' targets (lm, recall), and "
                             f"tasks has none")
        for budget in self.budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"budgets: {budget} is not a fraction in (0, 1]")
        if not self.budgets:
            raise ValueError("budgets must not be empty")
        for length in self.lengths:
            if length < 128:
                raise ValueError(f"lengths: {length} is below 128 tokens")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not 0 <= self.seed_base or self.seed_base + self.num_samples > TRAIN_SEED_BASE:
            raise ValueError(f"seed_base: seeds must stay in [0, {TRAIN_SEED_BASE}) (higher ones are training data)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.compression()  # window, sinks, observe_window, prefill and chunk_size, as every compressed cell uses them
        if not self.modes:
            raise ValueError("modes must not be empty")

    def compression(self, scorer="snapkv", allocator="uniform", budget: float = 0.1, merge=None) -> CompressionConfig:
        """The settings of a compressed cell: ``scorer``, ``allocator``, ``budget`` and ``merge`` (names or
        instances) with this run's prefill mode, chunk size, window, sinks and observation window."""
        return CompressionConfig(scorer, allocator, budget, self.prefill, self.chunk_size, self.window, self.sinks,
                                 merge=merge, observe_window=self.observe_window)

    @property
    def realtext_tasks(self) -> list[str]:
        """The real-text tasks of ``tasks`` (``lm``, ``recall``)."""
        from gatekv.eval.realtext import REALTEXT_TASKS

        return [t for t in self.tasks if t in REALTEXT_TASKS]

    @property
    def output_dir(self) -> Path:
        return Path(self.output)


def load_eval_config(path: str | Path | None, overrides: list[str] | None = None) -> EvalConfig:
    """Read an eval YAML with ``a.b=c`` overrides (``ValueError`` naming a bad key or value)."""
    return load_config(EvalConfig, path, overrides)
