"""``run_eval(config)``: every cell (method, allocator, budget, mode, task, length) over the same samples.

Output directory (``config.output``)::

    results.json             every finished cell with per-sample predictions and scores (written atomically after
                             each cell, so a crash loses no finished cell; a rerun resumes from it)
    results.md               (``gatekv.eval.report``) tables: one per (mode, length), rows = method / allocator / budget, columns = tasks
                             (accuracy tasks), and one per (mode, length) of the real-text tasks' metrics
    accuracy_vs_budget.png   mean accuracy over tasks vs budget, one line per method and allocator; one more panel
                             per real-text metric (lm NLL / KL, recall NLL / KL / copy / exact)

Trained adapters and training-free scorers go through the same path (:class:`gatekv.GateKV`): same prompts, same
allocators, same compacted cache. The full cache runs once per (task, length) and is the reference row.
Query-agnostic one-shot cells share one prefill per sample (:func:`gatekv.compress.shared_prefill`: every scorer
scores the same forward, each (scorer, allocator, budget) compacts its own copy): the answers are those of one
prefill per cell, several times faster; their progress is saved per sample. Cells whose allocator observes the
prefill (CAKE, D2O), LoRA adapters and query-aware cells run one prefill each.

Real-text tasks (``lm``, ``recall``; :mod:`gatekv.eval.realtext`) are scored teacher-forced, not by generation:
per sample, the full cache's log-probabilities come from one forward and serve every setting (its KL and Δ NLL);
the compressed settings of a mode share one prefill of that mode's prompt (query-aware cells too: the prompt then
ends with the instruction), each (scorer, allocator, budget) a compacted fork that the target is teacher-forced on.
Their cells hold ``metrics`` (means over samples) instead of ``accuracy``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gatekv.eval.config import EvalConfig, MethodConfig
from gatekv.eval.metrics import score_answer
from gatekv.eval.realtext import REALTEXT_METRICS, REALTEXT_TASKS
from gatekv.eval.report import format_markdown, plot_results
from gatekv.eval.results import Cell, EvalResults
from gatekv.eval.tasks import EvalSample, Haystack, make_task_samples
from gatekv.io import atomic_write_text

__all__ = ["grid", "run_eval"]

_COMPARABLE = ("model", "dtype", "num_samples", "seed_base", "haystack_files", "window", "sinks", "observe_window",
               "prefill", "chunk_size", "max_new_tokens")
_COMPARABLE_REALTEXT = {"corpus": "gnu-info", "continuation_tokens": 128, "recall_span": 96, "recall_cue": 8,
                        "recall_region": 0.8}
"""Settings that change real-text samples, with the value a results file written before they existed implies."""


def grid(config: EvalConfig, task_lengths: list[tuple[str, int]]) -> list[Cell]:
    """Every cell of the run, the full cache first (it is the reference)."""
    cells = []
    for method in config.methods:
        for task, length in task_lengths:
            if method.is_full:
                cells.append(Cell(method.name, "-", 1.0, "-", task, length))
                continue
            if method.is_oracle and task not in REALTEXT_TASKS:  # it needs a known target
                continue
            for mode in config.modes:
                for allocator in method.allocators:
                    for budget in config.budgets:
                        cells.append(Cell(method.name, allocator, budget, mode, task, length))
    return sorted(cells, key=lambda c: (c.allocator != "-", c.task, c.length))


def _check_resume(existing: EvalResults, config: dict, path: Path) -> None:
    differing = [k for k in _COMPARABLE if existing.config.get(k) != config.get(k)]
    if any(t in REALTEXT_TASKS for t in config.get("tasks", [])):
        differing += [k for k, old in _COMPARABLE_REALTEXT.items() if existing.config.get(k, old) != config.get(k)]
    if differing:
        details = "; ".join(f"{k}: {existing.config.get(k)!r} (file) vs {config.get(k)!r} (config)" for k in differing)
        raise ValueError(f"{path} was made with other settings ({details}); use another output or resume: false")
    old, new = existing.config.get("corpus_documents"), config.get("corpus_documents")
    if old is not None and new is not None and old != new:  # the samples are drawn from what is installed
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        raise ValueError(f"{path} was made from other corpus documents (missing here: {', '.join(missing) or 'none'}; "
                         f"new here: {', '.join(extra) or 'none'}), so its real-text samples differ; install the "
                         "same documents (see gatekv.corpus.CORPORA), or use another output")


def _samples(config: EvalConfig, tokenizer, head_tokens: int, documents=None) -> dict[tuple[str, int], list[EvalSample]]:
    """Every task's samples; ``documents``: the real-text corpus (``gatekv.corpus.Document`` list) if there are
    real-text tasks."""
    from gatekv.eval.loaders import load_suite

    haystack = Haystack.from_files(config.haystack_files) if config.haystack_files else None
    out = {}
    if config.realtext_tasks:
        from gatekv.eval.realtext import make_realtext_samples

        for task in config.realtext_tasks:
            for length in config.lengths:
                out[(task, length)] = make_realtext_samples(
                    task, tokenizer, documents, length, config.num_samples, config.seed_base,
                    config.continuation_tokens, config.recall_span, config.recall_cue, config.recall_region,
                    config.window)
    for task in config.tasks:
        if task in REALTEXT_TASKS:
            continue
        for length in config.lengths:
            out[(task, length)] = make_task_samples(task, tokenizer, length, config.num_samples, config.seed_base,
                                                    haystack, head_tokens)
    for suite in config.suites:
        samples = load_suite(suite.kind, suite.source, suite.split, suite.config_name, suite.max_samples or config.num_samples)
        out[(suite.name, 0)] = samples
    return out


def _check_lengths(model, config: EvalConfig, samples: dict, question_room: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    for (task, length), task_samples in samples.items():
        if task in REALTEXT_TASKS:
            longest = max(len(s.context_ids) + len(s.question_ids) + len(s.target_ids) for s in task_samples)
            if longest > limit:
                raise ValueError(f"lengths: {length} tokens (+ {task}'s question and target: {longest} in all) exceed "
                                 f"the model's max_position_embeddings {limit}")
            continue
        if length and length + question_room + config.max_new_tokens > limit:
            raise ValueError(
                f"lengths: {length} tokens (+ question and {config.max_new_tokens} new tokens) exceed the model's "
                f"max_position_embeddings {limit}"
            )


def _wrappers(model, tokenizer, config: EvalConfig) -> dict[str, object]:
    """One :class:`GateKV` per method (the full cache: no scorer)."""
    from gatekv.inference import GateKV

    out = {}
    for method in config.methods:
        merge = None
        if method.merge is not None:
            from gatekv.merge import get_merger

            merge = get_merger(method.merge, **method.merge_options)
        if method.is_full:
            out[method.name] = GateKV(model, tokenizer)
            continue
        scorer = method.scorer
        if method.is_oracle:
            from gatekv.eval.oracle import OracleScorer

            scorer = OracleScorer()  # its labels are set per sample (_run_realtext)
        elif method.adapter is None and method.options:
            from gatekv.scorers import get_scorer

            scorer = get_scorer(method.scorer, **method.options)
        settings = config.compression(scorer if method.adapter is None else "snapkv",
                                      _allocator(method, method.allocators[0]), config.budgets[0], merge)
        if method.adapter is not None:  # its trained heads replace the scorer (or join a rank mix)
            kv = GateKV(model, tokenizer, adapter=method.adapter, config=settings,
                        rank_mix=method.options.get("rank_mix"), heads_dtype=method.options.get("heads_dtype"))
            heads = kv.scorer.members["adapter"] if "rank_mix" in method.options else kv.scorer
            if "pool_kernel" in method.options:
                heads.set_pooling(method.options["pool_kernel"])
            if "recency" in method.options:
                heads.set_recency(method.options["recency"])
            out[method.name] = kv
        else:
            out[method.name] = GateKV(model, tokenizer, config=settings)
    return out


def _record(sample: EvalSample, answer) -> dict:
    kept = None
    if answer.stats is not None and answer.stats.events:
        kept = float(answer.stats.events[-1].kept_tokens.double().mean())
    return {"seed": sample.seed, "score": score_answer(answer.text, sample.answers, sample.metric),
            "prediction": answer.text, "answers": sample.answers, "prompt_tokens": answer.prompt_tokens,
            "kept_per_head": kept, "kv_ratio": answer.kv_bytes / max(answer.full_kv_bytes, 1),
            "seconds": answer.seconds}


def _finish_cell(results: EvalResults, cell: Cell, records: list[dict], seconds: float) -> None:
    accuracy = sum(r["score"] for r in records) / len(records)
    results.cells[cell.key] = {"cell": cell.__dict__, "accuracy": accuracy, "n": len(records), "seconds": seconds,
                               "samples": records}
    results.partial.pop(cell.key, None)


def _shareable(config: EvalConfig, method: MethodConfig, cell: Cell, kv) -> bool:
    """Whether ``cell`` can run on a prefill shared with other cells: query-agnostic, one-shot, a compressing method
    whose allocator does not observe the prefill itself, whose scores do not depend on the budget and whose adapter
    (if any) leaves the model unchanged."""
    from gatekv.allocators import get_allocator

    if method.is_full or cell.mode != "query_agnostic" or config.prefill != "one_shot":
        return False
    if kv.adapter is not None and kv.adapter.lora is not None:
        return False
    if getattr(kv.scorer, "needs_budget", False):  # its scores depend on the budget: one prefill per cell
        return False
    return not get_allocator(_allocator(method, cell.allocator)).observes_prefill


def _run_shared(config, model, tokenizer, group, task_samples, wrappers, methods, results, json_path, bar) -> None:
    """Every cell of ``group`` (same task and length), sample by sample, on one prefill per sample
    (:meth:`GateKV.answer_settings`): the same answers as one prefill per cell. Progress is saved after each sample
    (``results.partial``), so a crash loses at most the sample in flight."""
    from gatekv.inference import GateKV

    runner = GateKV(model, tokenizer, window=config.window, sinks=config.sinks, observe_window=config.observe_window)
    scorers = {c.method: wrappers[c.method].scorer for c in group}
    settings = [dict(scorer=c.method, allocator=_allocator(methods[c.method], c.allocator), budget=c.budget,
                     merge=wrappers[c.method].config.merge) for c in group]
    for index, sample in enumerate(task_samples):
        pending = [i for i, c in enumerate(group) if c.key not in results.cells and index not in _finished(results, c)]
        if not pending:
            continue
        answers = runner.answer_settings(sample.context, sample.question, [settings[i] for i in pending],
                                         scorers={group[i].method: scorers[group[i].method] for i in pending},
                                         max_new_tokens=config.max_new_tokens)
        for i, answer in zip(pending, answers):
            results.partial.setdefault(group[i].key, []).append({"index": index, **_record(sample, answer)})
            bar.update(1)
        bar.set_postfix_str(f"shared prefill: {len(pending)} cells, {group[0].task} sample {index + 1}")
        _finish_complete_cells(results, group, len(task_samples),
                               lambda cell, records: _finish_cell(results, cell, records, sum(r["seconds"] for r in records)))
        atomic_write_text(json_path, results.to_json())


def _finished(results: EvalResults, cell: Cell) -> set[int]:
    """Indices of the samples of ``cell`` already recorded in ``results.partial``."""
    return {r["index"] for r in results.partial.get(cell.key, [])}


def _finish_complete_cells(results: EvalResults, group: list[Cell], num_samples: int, finish) -> None:
    """``finish(cell, records)`` for every cell of ``group`` whose ``num_samples`` samples are all in
    ``results.partial``: its records in sample order, without their ``index``."""
    for cell in group:
        if cell.key not in results.cells and len(_finished(results, cell)) == num_samples:
            records = sorted(results.partial[cell.key], key=lambda r: r["index"])
            finish(cell, [{k: v for k, v in r.items() if k != "index"} for r in records])


def _shares_realtext_prefill(config: EvalConfig, method: MethodConfig, cell: Cell, kv) -> bool:
    """Whether a real-text cell can be a fork of the shared prefill of its mode's prompt (as :func:`_shareable`, in
    either mode: a query-aware prompt is the context with the instruction, compressed as a whole)."""
    return _shareable(config, method, Cell(cell.method, cell.allocator, cell.budget, "query_agnostic", cell.task,
                                           cell.length), kv)


def _realtext_record(index: int, sample, metrics: dict, prompt_tokens: int, cache, stats, seconds: float,
                     model) -> dict:
    from gatekv.cache import full_cache_kv_bytes

    kept, kv_ratio = None, 1.0
    if stats is not None and stats.events:
        kept = float(stats.events[-1].kept_tokens.double().mean())
    if cache is not None:
        total = len(sample.context_ids) + len(sample.question_ids) + len(sample.target_ids) - 1
        dtype = next(model.parameters()).dtype
        kv_ratio = cache.kv_bytes() / max(full_cache_kv_bytes(model.config, 1, total, dtype), 1)
    return {"index": index, "seed": sample.seed, "document": sample.document, "offset": sample.offset, **metrics,
            "target_tokens": len(sample.target_ids), "prompt_tokens": prompt_tokens, "kept_per_head": kept,
            "kv_ratio": kv_ratio, "seconds": seconds}


def _run_realtext(config, model, group, task_samples, wrappers, methods, results, json_path, bar) -> None:
    """Every cell of ``group`` (one real-text task and length), sample by sample: the full cache's log-probabilities
    once per sample, then per mode one shared prefill of the mode's prompt forked per setting (cells that cannot
    share one run their own session). Progress is saved after each sample (``results.partial``)."""
    from gatekv.compress import shared_prefill
    from gatekv.eval.realtext import full_logprobs, score_target, target_logits
    from gatekv.models import cache_kwarg

    device = next(model.parameters()).device
    kwarg = cache_kwarg(model)

    for index, sample in enumerate(task_samples):
        pending = [c for c in group if c.key not in results.cells and index not in _finished(results, c)]
        if not pending:
            continue
        task = sample.task
        start = time.perf_counter()
        full = full_logprobs(model, sample)
        full_seconds = time.perf_counter() - start
        records: dict[str, dict] = {}
        computed: dict[tuple, dict] = {}  # lm: both modes compress the same prompt, computed once
        for cell in [c for c in pending if c.allocator == "-"]:
            metrics = score_target(full, sample.target_ids, full, task)
            metrics.update(kl=0.0, delta_nll=0.0)  # the reference itself (exactly, not up to rounding)
            records[cell.key] = _realtext_record(index, sample, metrics, len(sample.context_ids), None, None,
                                                 full_seconds, model)
        for mode in config.modes:
            cells = [c for c in pending if c.mode == mode]
            prefix, rest = sample.prefix_ids(mode), sample.rest_ids(mode)
            prefix_kind = "context" if len(prefix) == len(sample.context_ids) else "prompt"
            todo = []
            for cell in cells:
                memo = computed.get((prefix_kind, cell.method, cell.allocator, cell.budget))
                if memo is not None:
                    records[cell.key] = {**memo, "index": index}
                else:
                    todo.append(cell)
            prefix_t = torch.tensor([prefix], dtype=torch.long, device=device)
            oracles = {c.method for c in todo if methods[c.method].is_oracle}
            if oracles:
                from gatekv.eval.oracle import oracle_labels

                labels = oracle_labels(model, sample, mode)
                for name in oracles:
                    wrappers[name].scorer.set_labels(labels)
            together = [c for c in todo if _shares_realtext_prefill(config, methods[c.method], c, wrappers[c.method])]
            alone = [c for c in todo if c not in together]
            if together:
                scorers = {c.method: wrappers[c.method].scorer for c in together}
                with torch.no_grad(), shared_prefill(model, scorers, window=config.window, sinks=config.sinks,
                                                     observe_window=config.observe_window,
                                                     reserve=wrappers[together[0].method].config.reserve) as shared:
                    begin = time.perf_counter()
                    last = shared.prefill(prefix_t)[0]
                    prefill_seconds = time.perf_counter() - begin
                    for cell in together:
                        begin = time.perf_counter()
                        cache, stats = shared.fork(cell.method, _allocator(methods[cell.method], cell.allocator),
                                                   cell.budget, wrappers[cell.method].config.merge)
                        logits = target_logits(model, cache, kwarg, last, rest, len(sample.target_ids))
                        metrics = score_target(logits, sample.target_ids, full, task)
                        seconds = prefill_seconds + time.perf_counter() - begin  # each is charged the prefill
                        records[cell.key] = _realtext_record(index, sample, metrics, len(prefix), cache, stats,
                                                             seconds, model)
            for cell in alone:
                kv = wrappers[cell.method]
                begin = time.perf_counter()
                with torch.no_grad(), kv.session(budget=cell.budget,
                                                 allocator=_allocator(methods[cell.method], cell.allocator)) as session:
                    cache = session.new_cache()
                    last = model(input_ids=prefix_t, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits[0, -1]
                    logits = target_logits(model, cache, kwarg, last, rest, len(sample.target_ids))
                    stats = session.stats
                metrics = score_target(logits, sample.target_ids, full, task)
                records[cell.key] = _realtext_record(index, sample, metrics, len(prefix), cache, stats,
                                                     time.perf_counter() - begin, model)
            for cell in todo:
                computed[(prefix_kind, cell.method, cell.allocator, cell.budget)] = records[cell.key]
        for cell in pending:
            results.partial.setdefault(cell.key, []).append(records[cell.key])
            bar.update(1)
        bar.set_postfix_str(f"{task}: {len(pending)} cells, sample {index + 1}")
        _finish_complete_cells(results, group, len(task_samples),
                               lambda cell, records: _finish_realtext_cell(results, cell, records))
        atomic_write_text(json_path, results.to_json())


def _finish_realtext_cell(results: EvalResults, cell: Cell, records: list[dict]) -> None:
    metrics = {name: sum(r[name] for r in records) / len(records) for name in REALTEXT_METRICS[cell.task]}
    metrics["full_nll"] = sum(r["full_nll"] for r in records) / len(records)
    results.cells[cell.key] = {"cell": cell.__dict__, "metrics": metrics, "n": len(records),
                               "seconds": sum(r["seconds"] for r in records), "samples": records}
    results.partial.pop(cell.key, None)


def _allocator(method: MethodConfig, name: str):
    """The allocator ``name`` of ``method``: its name, or an instance when the method gives it options."""
    if name not in method.allocator_options:
        return name
    from gatekv.allocators import get_allocator

    return get_allocator(name, **method.allocator_options[name])


def run_eval(config: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> EvalResults:
    """Run (or resume) the grid of ``config``; writes results.json / results.md / the plot. Returns the results.

    model, tokenizer: an already-loaded model (default: load ``config.model``)
    """
    from tqdm.auto import tqdm

    from gatekv.config import to_dict
    from gatekv.inference import prompt_ids
    from gatekv.models import load_base_model

    out = config.output_dir
    json_path = out / "results.json"
    plain = to_dict(config)
    documents = None
    if config.realtext_tasks:
        from gatekv.corpus import load_corpus

        documents = load_corpus(config.corpus)
        # real-text samples are windows of whatever documents this machine has: record which, check them on resume
        plain["corpus_documents"] = [document.name for document in documents]
    results = EvalResults(plain)
    if json_path.exists():
        if not config.resume:
            raise ValueError(f"{json_path} exists and resume is false; use another output directory")
        results = EvalResults.load(json_path)
        _check_resume(results, plain, json_path)
        results.config = plain
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if model is None:
        model, tokenizer = load_base_model(config.model, dtype=getattr(torch, config.dtype), device=config.device)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with an explicitly passed model")
    head_ids, tail_ids = prompt_ids(tokenizer, "", "")
    samples = _samples(config, tokenizer, head_ids.shape[1], documents)
    _check_lengths(model, config, samples, question_room=64)
    wrappers = _wrappers(model, tokenizer, config)
    methods = {m.name: m for m in config.methods}
    cells = grid(config, list(samples))
    todo = [c for c in cells if c.key not in results.cells]
    total = sum(len(samples[(c.task, c.length)]) - len(results.partial.get(c.key, [])) for c in todo)
    for key, records in results.partial.items():
        if any(not isinstance(r, dict) or not isinstance(r.get("index"), int) for r in records):
            raise ValueError(f"{json_path}: partial records of {key} lack their sample index; move the file away")
    bar = tqdm(total=total, desc="gatekv eval", unit="sample", disable=not progress, dynamic_ncols=True)
    realtext = [c for c in todo if c.task in REALTEXT_TASKS]
    todo = [c for c in todo if c.task not in REALTEXT_TASKS]
    shared = [c for c in todo if _shareable(config, methods[c.method], c, wrappers[c.method])]
    for cell in [c for c in todo if c.allocator == "-"] + [None] + [c for c in todo if c.allocator != "-"]:
        if cell is None:  # after the full-cache reference rows: cells sharing one prefill per sample
            for task, length in samples:
                group = [c for c in shared if (c.task, c.length) == (task, length)]
                if group:
                    _run_shared(config, model, tokenizer, group, samples[(task, length)], wrappers, methods, results,
                                json_path, bar)
            continue
        if cell in shared:
            continue
        kv = wrappers[cell.method]
        start = time.perf_counter()
        records = []
        for sample in samples[(cell.task, cell.length)]:
            overrides = {}
            if cell.allocator != "-":
                overrides = {"budget": cell.budget, "allocator": _allocator(methods[cell.method], cell.allocator)}
            answer = kv.answer(sample.context, sample.question, query_aware=cell.mode != "query_agnostic",
                               max_new_tokens=config.max_new_tokens, **overrides)
            records.append(_record(sample, answer))
            bar.update(1)
            bar.set_postfix_str(f"{cell.method}/{cell.allocator}/{cell.budget:g} {cell.task}")
        _finish_cell(results, cell, records, time.perf_counter() - start)
        atomic_write_text(json_path, results.to_json())  # a crash from here on loses no finished cell
    for task, length in samples:
        group = [c for c in realtext if (c.task, c.length) == (task, length)]
        if group:
            _run_realtext(config, model, group, samples[(task, length)], wrappers, methods, results, json_path, bar)
    bar.close()
    atomic_write_text(out / "results.md", format_markdown(results))
    try:
        plot_results(results, out / "accuracy_vs_budget.png")
    except ImportError as error:
        print(f"[gatekv eval] no plot: {error}")
    return results
