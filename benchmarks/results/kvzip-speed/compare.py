"""KVzip prefill before / after commit 004d1db, alternated in one process:
    python benchmarks/results/kvzip-speed/compare.py 2048
The pre-change scorer is read from git (004d1db^) into a temporary module, without its registration."""
import importlib.util, subprocess, sys, tempfile, time
from pathlib import Path
import torch
_source = subprocess.run(["git", "show", "004d1db^:gatekv/scorers/kvzip.py"], check=True, capture_output=True,
                         text=True).stdout.replace('@register_scorer("kvzip")', "")
_path = Path(tempfile.mkdtemp()) / "kvzip_old.py"
_path.write_text(_source)
_spec = importlib.util.spec_from_file_location("kvzip_old", _path)
kvzip_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kvzip_old)
from gatekv import compress
from gatekv.scorers import get_scorer
from gatekv.smollm2 import load_smollm2
from gatekv.eval.needle import needle_prompt
torch.set_num_threads(2)
model, tok = load_smollm2()
ids = needle_prompt(tok, int(sys.argv[1]), 0).prompt_ids
def run(sc):
    with torch.no_grad(), compress(model, sc, "adakv", budget=0.1, record=True) as s:
        cache = s.new_cache()
        t = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        total = time.perf_counter() - t
    return total, s.stats.score_seconds, [e.kept_positions for e in s.stats.events]
with torch.no_grad():
    t=time.perf_counter(); model(input_ids=ids, use_cache=True, logits_to_keep=1); stock=time.perf_counter()-t
res = {"old": [], "new": []}
kept = {}
for r in range(2):
    for name in ("old", "new"):
        sc = kvzip_old.KVzipScorer(tokenizer=tok) if name == "old" else get_scorer("kvzip", tokenizer=tok)
        total, score, k = run(sc)
        res[name].append((total, score)); kept[name] = k
same = all(torch.equal(a, b) for ea, eb in zip(kept["old"], kept["new"]) for a, b in zip(ea, eb))
print(f"prompt {ids.shape[1]}, stock prefill {stock:.2f} s; same kept positions: {same}")
for name, v in res.items():
    print(name, " ".join(f"total {t:.2f} s (x{t/stock:.2f} stock), score {s:.2f} s" for t, s in v))
