"""The family's own decode loop: greedy generation with the ragged cache (the family's models are trained from
scratch and benchmarked on their own; the engine's loop and strategies serve pretrained models)."""

from __future__ import annotations

import torch

from .cache import RaggedKVCache
from .model import Counter, FamilyModel


@torch.no_grad()
def generate(model: FamilyModel, ids: torch.Tensor, max_new_tokens: int, token_type: torch.Tensor | None = None,
             eos_id: int | None = None, counter: Counter | None = None) -> tuple[torch.Tensor, RaggedKVCache]:
    """Greedy decoding with the ragged cache: prefill ``ids`` (B, T) (with its token-type mask), then one
    token per step (generated tokens are never designated). Returns the new tokens (B, n) and the cache."""
    B = ids.shape[0]
    cache = model.new_cache(B)
    logits, _ = model(ids, token_type, cache, mode="threshold", counter=counter, last_only=True)
    out = []
    done = torch.zeros(B, dtype=torch.bool)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if i + 1 == max_new_tokens or int(cache.seen.max()) >= model.cfg.max_len:
            break
        logits, _ = model(nxt.view(B, 1), None, cache, mode="threshold", counter=counter)
    return torch.stack(out, 1), cache
