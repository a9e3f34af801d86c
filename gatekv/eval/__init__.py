"""Evaluation: offline RULER-style task generators, real-text tasks (``lm``, ``recall``), public-suite loaders, metrics
and the ``gatekv eval`` runner.

    from gatekv.eval import load_eval_config, run_eval
    results = run_eval(load_eval_config("configs/eval/quickstart.yaml"))
"""

from gatekv.eval.config import EvalConfig, MethodConfig, SuiteConfig, load_eval_config
from gatekv.eval.metrics import score_answer
from gatekv.eval.needle import NeedlePrompt, chat_template_parts, haystack_sentences, needle_prompt
from gatekv.eval.realtext import REALTEXT_TASKS, RealTextSample, make_realtext_samples
from gatekv.eval.tasks import TASKS, EvalSample, Haystack, make_task_sample, make_task_samples

__all__ = [
    "TASKS",
    "EvalConfig",
    "EvalSample",
    "Haystack",
    "MethodConfig",
    "NeedlePrompt",
    "REALTEXT_TASKS",
    "RealTextSample",
    "SuiteConfig",
    "chat_template_parts",
    "haystack_sentences",
    "load_eval_config",
    "make_realtext_samples",
    "make_task_sample",
    "make_task_samples",
    "needle_prompt",
    "run_eval",
    "score_answer",
]


def run_eval(config, **kwargs):
    """Run an evaluation grid (see :func:`gatekv.eval.runner.run_eval`)."""
    from gatekv.eval.runner import run_eval as _run

    return _run(config, **kwargs)
