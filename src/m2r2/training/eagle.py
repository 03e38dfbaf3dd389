"""Train the EAGLE-style draft head (``m2r2.decoding.drafters.eagle``) by self-distillation on the frozen model.

    python -m m2r2.training.eagle --data data/distill-smollm2-135m --out runs/eagle --steps 300 --threads 2
    accelerate launch -m m2r2.training.eagle --data ... --out ...   # the same on many processes / GPUs

Batches, scored positions and schedule are those of ``m2r2 train`` (``m2r2.training.adapters``: ``batch_indices``,
``make_batch``, warm-up + cosine); each step runs the frozen model over the batch for its final hidden states (the
features the head reads and predicts) and trains the head's fc and layer (``eagle_loss``). Runs through Hugging
Face Accelerate (the head is the only trainable module). Writes ``<out>/eagle.{safetensors,json}`` and
``draft_vocab.json`` (the frequent-token draft vocabulary the head reads out over); the json records the command,
tokens seen and wall time. Checkpoints atomically every ``--checkpoint-every`` steps; re-run the same command to
resume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from .loop import Run


class _Step(nn.Module):
    """The frozen target's features and the head's loss, as one module for Accelerate."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, ids, valid):
        from ..decoding.drafters.eagle import eagle_loss
        from ..stream.accelerator import slow_trace
        with torch.no_grad():
            states, _ = slow_trace(self.model, ids)
            feats = states[-1]
            del states
        return eagle_loss(self.head, feats, ids, valid)


def _add_args(p: argparse.ArgumentParser) -> None:
    from .loop import add_run_args
    add_run_args(p, out="runs/eagle", steps=300, warmup_steps=20, lr=1e-3, checkpoint_every=25)
    p.add_argument("--model", default=None, help="model (default: the embedded one)")


def main(args: argparse.Namespace) -> int:
    from accelerate import Accelerator as HFAccelerator

    from ..api import load
    from ..artifacts import read_draft_vocab, write_draft_vocab
    from ..decoding.drafters.eagle import EagleHead
    from ..errors import M2R2Error
    from ..provenance import command_line
    from .adapters import TrainConfig, batch_indices, lr_at, make_batch
    from .data import load_dataset

    hfacc = HFAccelerator(cpu=not torch.cuda.is_available())
    if args.threads:
        torch.set_num_threads(args.threads)
    sched = TrainConfig(data=args.data, steps=args.steps, warmup_steps=args.warmup_steps, lr=args.lr,
                        batch_size=args.batch_size, max_len=args.max_len, seed=args.seed)
    lm = load(model=args.model, threads=args.threads)
    model = lm.model.requires_grad_(False)
    records = load_dataset(args.data, model_identity=lm.source.identity)
    if len(records) < args.batch_size:
        raise M2R2Error(f"{args.data} has {len(records)} examples, fewer than --batch-size {args.batch_size}")
    run = Run(args.out, main=hfacc.is_main_process)
    out = run.out
    if hfacc.is_main_process:  # the draft vocabulary first: the head reads out over it from step 0
        write_draft_vocab(out, records, args.draft_vocab, always=tuple(model.cfg.eos_token_ids))
    hfacc.wait_for_everyone()
    vocab = read_draft_vocab(out, model.cfg.vocab_size)
    torch.manual_seed(args.seed)
    head = EagleHead(model, vocab, lm.source.identity)
    params = head.trainable()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    identity = {k: v for k, v in vars(args).items()
                if k not in ("out", "threads", "no_progress", "checkpoint_every", "stop_at")}
    step, tokens, wall_before = 0, 0, 0.0
    ck = run.checkpoint()
    if ck is not None:
        run.refuse_other_settings(ck["identity"], identity, detail=False)
        head.load_trained(ck["head"])
        opt.load_state_dict(ck["opt"])
        step, tokens, wall_before = ck["step"], ck["tokens"], ck["wall_seconds"]
        run.resumed(step)
    module, opt = hfacc.prepare(_Step(model, head), opt)
    t_start = time.perf_counter()
    rank, world = hfacc.process_index, hfacc.num_processes

    def checkpoint() -> None:
        hfacc.wait_for_everyone()
        run.save({"identity": identity, "head": hfacc.unwrap_model(module).head.trained_state(),
                  "opt": opt.state_dict(), "step": step, "tokens": tokens,
                  "wall_seconds": wall_before + time.perf_counter() - t_start})

    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    last: dict = {}

    def train_step(s: int) -> tuple[dict, dict]:
        nonlocal step, tokens, last
        ids, valid = make_batch(records, batch_indices(len(records), s, args.batch_size, args.seed)[rank::world],
                                args.max_len)
        lr = lr_at(s, sched)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, st = module(ids.to(hfacc.device), valid.to(hfacc.device))
        opt.zero_grad(set_to_none=True)
        hfacc.backward(loss)
        st["grad_norm"] = float(hfacc.clip_grad_norm_(params, 1.0))
        opt.step()
        step = s + 1
        ntok = int(valid.sum()) * world
        tokens += ntok
        last = {"step": step, "lr": lr, "tokens": ntok, **st}
        return last, {"loss": f"{st['loss']:.3f}", "reg": f"{st['reg']:.3f}", "agree": f"{st['agree']:.2f}"}

    module.train()
    run.steps(step, more=lambda s: s < end, train_step=train_step,
              due=lambda s: s % args.checkpoint_every == 0 or s == end, checkpoint=checkpoint,
              progress=not args.no_progress, bar=dict(total=end, initial=step, desc="train eagle", unit="step"))
    if not last:  # resumed at the end: the last logged step
        last = run.logged(step)
    if hfacc.is_main_process:
        head.training_info = {"command": command_line(), "config": identity, "examples": len(records),
                              "steps": step, "schedule_steps": args.steps, "tokens_seen": tokens,
                              "wall_seconds": round(wall_before + time.perf_counter() - t_start, 1),
                              "threads": args.threads, "processes": world, "last_log": last}
        head.save(out, dtype=torch.float32)
        print(json.dumps(last), flush=True)
    return 0


def ship(src: str, dst: str) -> Path:
    """Copy a trained EAGLE head directory into the package as float16."""
    from .peers import ship as ship_peer
    return ship_peer(src, dst)


if __name__ == "__main__":
    from ..options import run_standalone
    run_standalone("python -m m2r2.training.eagle", __doc__.split("\n\n")[0], _add_args, main)
