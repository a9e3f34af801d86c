"""FairKV: how unequal head-wise budgets (Ada-KV on SnapKV scores) load tensor-parallel shards, simulated on one
machine (measures; asserts nothing).

Load of a shard = tokens its KV heads keep; a decode step waits for the slowest shard in every layer, so the
figure is ``sum_l max_s load / sum_l mean_s load`` (1.00 = perfectly balanced). Three settings on the same prompts:
plain tensor parallelism (contiguous heads), the LPT head-to-shard assignment, and LPT plus budget rebalancing.

    python benchmarks/fairkv_balance.py                      # tiny random Llama, 8 KV heads, tp 2 and 4 (seconds)
    python benchmarks/fairkv_balance.py --smollm2 --tokens 1024   # SmolLM2-135M (3 KV heads: tp 3)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from gatekv import compress, get_allocator  # noqa: E402
from gatekv.models import cache_kwarg  # noqa: E402
from gatekv.allocators.fairkv import _imbalance, balance_report, shard_loads  # noqa: E402


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    return model, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="use SmolLM2-135M (gatekv.smollm2) instead of a tiny random model")
    parser.add_argument("--tokens", type=int, default=256, help="prompt length")
    parser.add_argument("--prompts", type=int, default=2, help="batch rows")
    parser.add_argument("--budget", type=float, default=0.2, help="share of the prompt kept per KV head")
    parser.add_argument("--tp", type=int, nargs="*", help="tensor-parallel degrees (default: divisors of the KV heads)")
    args = parser.parse_args()

    if args.smollm2:
        from gatekv.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        text = " ".join(f"Fact {i}: the value of item {i} is {i * 7 % 101}." for i in range(args.tokens // 8))
        ids = tokenizer([text] * args.prompts, return_tensors="pt").input_ids[:, : args.tokens]
        name = "SmolLM2-135M"
    else:
        model, _ = _tiny_model()
        ids = torch.randint(3, 256, (args.prompts, args.tokens), generator=torch.Generator().manual_seed(0))
        name = "tiny random Llama"
    heads = model.config.num_key_value_heads
    degrees = args.tp or [d for d in range(2, heads + 1) if heads % d == 0]
    print(f"model {name} ({model.config.num_hidden_layers} layers, {heads} KV heads), device cpu, "
          f"{ids.shape[0]} x {ids.shape[1]} tokens, budget {args.budget}, scores: snapkv, head-wise budgets: adakv")

    with torch.no_grad(), compress(model, "snapkv", "adakv", budget=args.budget) as session:
        model(input_ids=ids, **{cache_kwarg(model): session.new_cache()})
    counts = list(session.stats.kept_tokens)  # per layer (B, H_kv)
    for tp in degrees:
        report = balance_report(counts, tp)
        fair = get_allocator("fairkv", tp=tp, inner="adakv", rebalance=True)
        with torch.no_grad(), compress(model, "snapkv", fair, budget=args.budget) as balanced:
            model(input_ids=ids, **{cache_kwarg(model): balanced.new_cache()})
        rebalanced = list(balanced.stats.kept_tokens)
        after = _imbalance(shard_loads(rebalanced, fair.last_assignment, tp))
        print(f"tp {tp}: max/mean shard load  contiguous {report['before']:.3f}  LPT {report['after']:.3f}  "
              f"LPT + rebalanced budgets {after:.3f}")


if __name__ == "__main__":
    main()
