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
from pathlib import Path

import torch
from torch import nn

from .loop import Run, distill_run


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
    record = distill_run(
        args, run, hfacc, _Step(model, head), opt, params, records,
        batch=lambda s, rank, world: make_batch(
            records, batch_indices(len(records), s, args.batch_size, args.seed)[rank::world], args.max_len),
        lr=lambda s: lr_at(s, sched),
        state=("head", lambda m: m.head.trained_state(), head.load_trained),
        postfix=lambda st: {"loss": f"{st['loss']:.3f}", "reg": f"{st['reg']:.3f}", "agree": f"{st['agree']:.2f}"},
        desc="train eagle")
    if hfacc.is_main_process:
        head.training_info = record
        head.save(out, dtype=torch.float32)
        print(json.dumps(record["last_log"]), flush=True)
    return 0


def ship(src: str, dst: str) -> Path:
    """Copy a trained EAGLE head directory into the package as float16."""
    from .peers import ship as ship_peer
    return ship_peer(src, dst)


if __name__ == "__main__":
    from ..options import run_standalone
    run_standalone("python -m m2r2.training.eagle", __doc__.split("\n\n")[0], _add_args, main)
