#!/usr/bin/env python
"""Does fusing the non-matmul work of a decode step buy speed? A torch.compile probe.

A plain decode step of the embedded model spends ~9 of ~33 ms outside the matrix products
(``scripts/probe_decode_cost.py``). This probe writes the step as one static-shape function (the cache
as fixed-size tensors written with ``index_copy_``, attention over the whole cache under a mask), runs it
eagerly, then through ``torch.compile`` (inductor: norms, RoPE, residuals and the SiLU gate fused into
generated C++), with every linear kept as an opaque custom op so inductor cannot replace the
bandwidth-tuned matrix-vector layout with its own kernel. It decodes 128 greedy tokens each way, checks
they equal ``lm.generate``'s and prints decode tokens/s.

    python scripts/probe_compile.py      # ~1 min of compilation on 2 cores
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import m2r2
from m2r2.provenance import pin_threads
from m2r2.engine.model import Linear

MAX_LEN = 384
PROMPT = "Write a short story about a robot learning to paint."


@torch.library.custom_op("m2r2_probe::linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear's batch-1 product on its (parts, in/parts, out) layout, opaque to the compiler."""
    xp = x.reshape(-1, w.shape[0], w.shape[1]).transpose(0, 1)
    return torch.bmm(xp, w).sum(0).view(*x.shape[:-1], w.shape[-1])


@packed_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[-1])


def main() -> None:
    pin_threads(2)
    lm = m2r2.load()
    model, cfg = lm.model, lm.model.cfg
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ref = lm.generate(PROMPT, max_new_tokens=128)
    Linear.forward = lambda self, x: packed_linear(x, self.weight)  # after the reference run

    def step(tok, pos, kc, vc):
        x = model.embed_tokens(tok)
        cos = model.rope_cos[pos].view(1, 1, 1, hd)
        sin = model.rope_sin_folded[pos].view(1, 1, 1, hd)
        mask = (torch.arange(MAX_LEN) <= pos).view(1, 1, 1, MAX_LEN)
        for i, b in enumerate(model.layers):
            qkv = b.qkv(b.input_norm(x))
            qk = qkv[..., : cfg.q_size + cfg.kv_size].view(1, 1, H + KV, hd)
            qk = qk * cos + torch.roll(qk, hd // 2, dims=-1) * sin
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = qkv[..., cfg.q_size + cfg.kv_size:].view(1, 1, KV, hd).transpose(1, 2)
            kc[i].index_copy_(2, pos, k)
            vc[i].index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, kc[i], vc[i], attn_mask=mask, scale=b.scale, enable_gqa=True)
            x = x + b.o(o.transpose(1, 2).reshape(1, 1, cfg.q_size))
            x = x + b.mlp(x)
        return model.head(x)[:, 0]

    ids = lm.encode(PROMPT)

    def run(fn):
        kc = torch.zeros(cfg.num_layers, 1, KV, MAX_LEN, hd)
        vc = torch.zeros_like(kc)
        out = []
        with torch.inference_mode():
            for j, t in enumerate(ids):
                logits = fn(torch.tensor([[t]]), torch.tensor([j]), kc, vc)
            t0 = time.perf_counter()
            for pos in range(len(ids), len(ids) + 128):
                out.append(int(logits.argmax(-1)))
                logits = fn(torch.tensor([[out[-1]]]), torch.tensor([pos]), kc, vc)
        return out, 128 / (time.perf_counter() - t0)

    out, tps = run(step)
    print(f"lm.generate: {ref.stats.decode_tokens_per_s:.1f} tok/s; static step, eager: {tps:.1f} tok/s, "
          f"same tokens: {out == ref.token_ids}")
    t = time.perf_counter()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    run(compiled)
    print(f"compiled in {time.perf_counter() - t:.0f} s (first run included)")
    for _ in range(3):
        out, tps = run(compiled)
        print(f"static step, compiled: {tps:.1f} tok/s, same tokens: {out == ref.token_ids}")


if __name__ == "__main__":
    main()
