"""Recovery fine-tune of a MoEfied model for a small top-k (``python -m m2r2.moe.recover``).

MoEfication alone keeps quality only when most experts run (SwiGLU activations are not sparse): at a quarter
of the FFN active the embedded model's perplexity is in the thousands. This trainer teaches the experts to work
in the sparse regime: the routers stay as MoEfication fitted them, the top-k experts of every token run (a neuron
mask over the dense FFN, which is exactly the sum of the selected experts), and low-rank deltas on every layer's
gate, up and down projections (LoRA, rank ``--rank``; all experts of a layer share them, as they are slices of
the same matrices) are trained to match the dense model's next-token distribution (KL(dense || MoE) on the
self-distillation records, the batches and schedule of ``m2r2 train``). The deltas are small (rank 16: 2.8 M
numbers for the embedded model, shipped as float16) and are folded into the experts when the MoE is built
(``moefy.apply``), so every run of the MoE, every provider and every kernel, computes from the recovered experts.

    python -m m2r2.moe.recover --moe runs/moefy-e16 --data data/distill-smollm2-135m-2048 --out runs/moe-e16-rec \\
        --steps 300 --threads 2
    accelerate launch -m m2r2.moe.recover ...   # the same on many processes / GPUs

Writes ``<out>/moe.{safetensors,json}``: the input MoEfication plus the deltas and a ``recovery`` record (command,
steps, tokens, wall time, last losses). Checkpoints atomically every ``--checkpoint-every`` steps; re-run the same
command to resume.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from ..training.loop import Run, distill_run


class Recovery(nn.Module):
    """The frozen dense model, its MoEfication's routers, and the trainable low-rank deltas (L, ...)."""

    def __init__(self, model, art, rank: int, top_k: int):
        super().__init__()
        c = model.cfg
        L, D, I = c.num_layers, c.hidden_size, c.intermediate_size
        self.model, self.top_k = model, top_k
        self.register_buffer("router_w", art.router_w.float(), persistent=False)
        self.register_buffer("router_b", art.router_b.float(), persistent=False)
        owner = torch.empty(L, I, dtype=torch.long)  # expert of each neuron
        for i in range(L):
            for e, idx in enumerate(art.perm[i]):
                owner[i, idx] = e
        self.register_buffer("owner", owner, persistent=False)
        g = torch.Generator().manual_seed(0)
        self.gu_a = nn.Parameter(torch.randn(L, rank, D, generator=g) / D ** 0.5)
        self.gu_b = nn.Parameter(torch.zeros(L, 2 * I, rank))
        self.down_a = nn.Parameter(torch.randn(L, rank, I, generator=g) / I ** 0.5)
        self.down_b = nn.Parameter(torch.zeros(L, D, rank))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {"gu_a": self.gu_a, "gu_b": self.gu_b, "down_a": self.down_a, "down_b": self.down_b}

    def _mlp(self, i: int, blk):
        def mlp(x: torch.Tensor) -> torch.Tensor:
            h = blk.post_norm(x)
            gu = blk.gate_up(h) + (h @ self.gu_a[i].t()) @ self.gu_b[i].t()
            g, u = gu.chunk(2, dim=-1)
            a = F.silu(g) * u
            with torch.no_grad():
                top = (h @ self.router_w[i].t() + self.router_b[i]).topk(self.top_k, -1).indices
                chosen = torch.zeros(*top.shape[:-1], self.router_w.shape[1], dtype=a.dtype).scatter_(-1, top, 1.0)
                mask = chosen[..., self.owner[i]]
            a = a * mask
            return blk.down(a) + (a @ self.down_a[i].t()) @ self.down_b[i].t()
        return mlp

    def logits(self, ids: torch.Tensor, sparse: bool) -> torch.Tensor:
        from ..engine import native
        from ..stream.accelerator import slow_trace
        blocks = self.model.layers
        if sparse:  # the instance attribute shadows Block.mlp for this forward
            for i, blk in enumerate(blocks):
                blk.mlp = self._mlp(i, blk)
        try:
            with native.disabled():
                states, _ = slow_trace(self.model, ids)
        finally:
            for blk in blocks:
                blk.__dict__.pop("mlp", None)
        return self.model.head(states[-1])

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            teacher = torch.log_softmax(self.logits(ids, sparse=False)[valid].float(), -1)
        student = torch.log_softmax(self.logits(ids, sparse=True)[valid].float(), -1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        with torch.no_grad():
            agree = float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
        return kl, {"kl": float(kl.detach()), "agree": agree}


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..options import int_at_least
    from ..training.loop import add_run_args
    add_run_args(p, out="runs/moe-recovered", steps=300, warmup_steps=20, lr=2e-3, checkpoint_every=10,
                 draft_vocab=False)
    p.add_argument("--moe", required=True, help="the MoEfication to recover (a `m2r2 moefy --out` directory)")
    p.add_argument("--rank", type=int_at_least("--rank", 1), default=16)
    p.add_argument("--top-k", type=int_at_least("--top-k", 1), default=None,
                   help="experts per token to train for (default: the MoEfication's own top-k)")
    p.add_argument("--model", default=None, help="model (default: the embedded one)")


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from accelerate import Accelerator as HFAccelerator

    from ..api import load
    from ..errors import AdapterError
    from ..training.adapters import TrainConfig, batch_indices, lr_at, make_batch
    from ..training.data import load_dataset
    from .moefy import MoEfyArtifacts

    hfacc = HFAccelerator(cpu=not torch.cuda.is_available())
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(model=args.model, threads=args.threads)
    model = lm.model.requires_grad_(False)
    art = MoEfyArtifacts.load(args.moe, lm.source.identity)
    if art.lora:
        raise AdapterError(f"{args.moe} is already recovered; start from the plain MoEfication")
    top_k = args.top_k or art.spec.top_k
    if not 1 <= top_k <= art.spec.num_experts:
        raise AdapterError(f"--top-k must be in [1, {art.spec.num_experts}], got {top_k}")
    sched = TrainConfig(data=args.data, steps=args.steps, warmup_steps=args.warmup_steps, lr=args.lr,
                        batch_size=args.batch_size, max_len=args.max_len, seed=args.seed)
    records = load_dataset(args.data, model_identity=lm.source.identity)
    if len(records) < args.batch_size:
        raise AdapterError(f"{args.data} has {len(records)} examples, fewer than --batch-size {args.batch_size}")
    run = Run(args.out, error=AdapterError, main=hfacc.is_main_process)
    rec = Recovery(model, art, args.rank, top_k)
    params = list(rec.deltas().values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def load_deltas(saved: dict) -> None:
        with torch.no_grad():
            for k, p in rec.deltas().items():
                p.copy_(saved[k])

    record = distill_run(
        args, run, hfacc, rec, opt, params, records,
        batch=lambda s, rank, world: make_batch(
            records, batch_indices(len(records), s, args.batch_size, args.seed)[rank::world], args.max_len),
        lr=lambda s: lr_at(s, sched),
        state=("deltas", lambda m: {k: v.detach().clone() for k, v in m.deltas().items()}, load_deltas),
        postfix=lambda st: {"kl": f"{st['kl']:.3f}", "agree": f"{st['agree']:.2f}"},
        desc="recover moe")
    if hfacc.is_main_process:
        art.lora = {k: v.detach().to(torch.float16).contiguous() for k, v in rec.deltas().items()}
        art.spec = dataclasses.replace(art.spec, top_k=top_k)
        art.info["recovery"] = record
        art.save(run.out)
        print(json.dumps(record["last_log"]), flush=True)
    return 0


if __name__ == "__main__":
    from ..options import run_standalone
    run_standalone("python -m m2r2.moe.recover", __doc__.split("\n\n")[0], _add_args, main)
