#!/usr/bin/env python
"""Held-out acceptance of M2R2 adapter directories as speculative drafters, on the same prompts.

Every 10th of the 80 MT-Bench questions (8 prompts, one per category), 64 greedy tokens, 2 threads:
acceptance (accepted / drafted) and tokens per verification for each adapter directory given.

    python scripts/compare_adapters.py src/m2r2/adapters/smollm2-135m-instruct-r2 runs/adapter-r2-long
"""

from __future__ import annotations

import sys

import m2r2
from m2r2.provenance import pin_threads
from m2r2.prompts import load_prompts


def main(adapters: list[str]) -> None:
    pin_threads(2)
    lm = m2r2.load()
    prompts = load_prompts("mt-bench")[::10][:8]
    for ad in adapters:
        accepted = drafted = steps = 0
        for p in prompts:
            out = lm.generate(p.text, max_new_tokens=64, strategy=lm.strategy("m2r2", adapter=ad))
            e = out.stats.extra
            accepted, drafted, steps = accepted + e["accepted"], drafted + e["drafted"], steps + e["verify_steps"]
        print(f"{ad}: acceptance {accepted / drafted:.3f}, tokens/verify {(accepted + steps) / steps:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
