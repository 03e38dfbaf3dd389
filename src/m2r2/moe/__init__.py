"""Mixture-of-Experts inference under a fast-memory budget, with ahead-of-time expert loading.

* ``layers``: the MoE feed-forward (router + experts as flat weight buffers) and the block that plugs it
  into the engine's per-layer seam, so the decode loop, cache and strategies stay the engine's own;
* ``moefy``: a real MoE built from a dense model by MoEfication (neurons clustered into experts on
  co-activation, per-layer routers fitted on the self-distillation data);
* ``hf``: Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, OLMoE) on the same blocks;
* ``memory``: the memory hierarchy: a budget of B expert slots in fast memory, a background loader over
  a modelled link or real storage reads with the page cache bypassed, LRU/LFU/prediction-aware eviction;
* ``prefetch``: the strategies (on-demand, slow-state prefetch, M2R2 fast-stream prefetch, oracle).
"""
