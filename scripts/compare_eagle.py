"""Held-out acceptance of EAGLE heads: one draft per verification (gamma 1, not adapting) on 16 MT-Bench prompts
(every fifth), 128 new tokens each, greedy, 2 threads; prints accepted / drafted per head directory.

    python scripts/compare_eagle.py src/m2r2/adapters/smollm2-135m-instruct-eagle runs/eagle-1800
"""

import sys

import torch

import m2r2
from m2r2.prompts import load_prompts

torch.set_num_threads(2)
lm = m2r2.load()
prompts = load_prompts("mt-bench")[::5][:16]
for path in sys.argv[1:]:
    accepted = drafted = 0
    for rec in prompts:
        ids = lm.encode_messages([{"role": "user", "content": rec.text}])
        st = lm.strategy("eagle", adapter=path, gamma=1, max_gamma=1, adaptive=False)
        r = lm.generate(ids, max_new_tokens=128, strategy=st)
        accepted += r.stats.extra["accepted"]
        drafted += r.stats.extra["drafted"]
    print(f"{path}: depth-1 acceptance on {len(prompts)} MT-Bench prompts {accepted / drafted:.3f} "
          f"({accepted}/{drafted})", flush=True)
