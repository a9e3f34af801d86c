"""Public long-context suites through ``datasets``: RULER, LongBench, InfiniteBench (a Hub id or a local copy).

    samples = load_suite("longbench", "THUDM/LongBench", config_name="hotpotqa", split="test", max_samples=50)
    samples = load_suite("ruler", "data/ruler/niah_single_2/validation.jsonl")

Each record becomes an :class:`~gatekv.eval.tasks.EvalSample` (task = the suite name):

- ``ruler``: RULER's prepared jsonl (``input``, ``outputs``); the question is the text after the last blank line of
  ``input`` (RULER's templates end with the question), the context everything before; metric ``all``.
- ``longbench``: ``context``, ``input`` (the question), ``answers`` (list); metric ``contains`` (LongBench's own
  F1/ROUGE metrics are not reproduced: a reported figure is substring accuracy).
- ``infinitebench``: ``context``, ``input``, ``answer`` (string or list); metric ``contains``.

``datasets`` is part of the ``train`` extra; a clear ``ImportError`` says so when it is missing.
"""

from __future__ import annotations

from pathlib import Path

from gatekv.eval.tasks import EvalSample

__all__ = ["SUITES", "load_suite"]

SUITES = ("ruler", "longbench", "infinitebench")
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _records(source: str, split: str, config_name: str | None):
    try:
        import datasets
    except ImportError:
        raise ImportError("loading public suites needs the 'datasets' package: pip install 'gatekv[train]'") from None
    path = Path(source)
    if path.exists():
        files = sorted(path.glob("*")) if path.is_dir() else [path]
        files = [f for f in files if f.suffix in _LOCAL_FORMATS]
        if not files:
            raise ValueError(f"suite source {source}: no {sorted(_LOCAL_FORMATS)} files found")
        kinds = {_LOCAL_FORMATS[f.suffix] for f in files}
        if len(kinds) != 1:
            raise ValueError(f"suite source {source}: mixed file formats {sorted(kinds)}")
        return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    return datasets.load_dataset(source, config_name, split=split)


def _need(record: dict, keys: tuple[str, ...], kind: str, index: int) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{kind} record {index} lacks column(s) {missing} (has {sorted(record)})")


def load_suite(kind: str, source: str, split: str = "test", config_name: str | None = None,
               max_samples: int | None = None) -> list[EvalSample]:
    """Samples of a public suite (see the module docstring); ``source`` is a local file/directory or a Hub id."""
    if kind not in SUITES:
        raise ValueError(f"unknown suite kind {kind!r}; valid: {list(SUITES)}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    samples = []
    for index, record in enumerate(_records(source, split, config_name)):
        if max_samples is not None and len(samples) >= max_samples:
            break
        if kind == "ruler":
            _need(record, ("input", "outputs"), kind, index)
            text = record["input"]
            context, _, question = text.rpartition("\n\n")
            if not context:
                context, question = text, ""
            answers, metric = [str(a) for a in record["outputs"]], "all"
        elif kind == "longbench":
            _need(record, ("context", "input", "answers"), kind, index)
            context, question, answers, metric = record["context"], record["input"], list(record["answers"]), "contains"
        else:
            _need(record, ("context", "input", "answer"), kind, index)
            answer = record["answer"]
            answers = [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]
            context, question, metric = record["context"], record["input"], "contains"
        answers = [a for a in answers if a.strip()]
        if not answers:
            continue  # nothing to score against
        samples.append(EvalSample(kind, index, context, question, answers, metric, 0, {"source": source}))
    if not samples:
        raise ValueError(f"suite {kind} from {source}: no usable samples")
    return samples
