"""Train the speculative peers that need training: Medusa heads and a distilled 2-model draft.

    python -m m2r2.training.peers --data data/distill-smollm2-135m --out runs/peers --steps 40 --warmup-steps 8 --threads 1

Same data, batches and number of scored tokens as ``m2r2 train`` with the same ``--steps/--batch-size/
--max-len/--seed`` (``m2r2.training.adapters.batch_indices`` and ``make_batch``: the scored positions are the last prompt
position and the response). Both peers learn from the frozen full model (KL to its distribution), so one
teacher forward per batch serves both; each has its own AdamW optimiser and the schedule of ``m2r2 train``.
Writes ``<out>/medusa`` and ``<out>/draft`` (each with the frequent-token draft vocabulary and a json
recording the command, tokens and wall time: the shared teacher time and each peer's own time).
Checkpoints atomically every ``--checkpoint-every`` steps; re-run the same command to resume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .loop import Run


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..options import int_at_least, int_list
    from .loop import add_run_args
    add_run_args(p, out="runs/peers", steps=40, warmup_steps=8, lr=3e-3, checkpoint_every=10)
    p.add_argument("--medusa-heads", type=int_at_least("--medusa-heads", 1), default=3)
    p.add_argument("--draft-layers", type=int_list("--draft-layers", 0, text=True), default="0,1,2,3",
                   help="layers of the target kept in the draft model")
    p.add_argument("--draft-rank", type=int_at_least("--draft-rank", 1), default=32)


def main(args: argparse.Namespace) -> int:
    from ..stream.accelerator import slow_trace
    from ..api import load
    from ..artifacts import write_draft_vocab
    from ..provenance import command_line
    from .data import load_dataset
    from ..decoding.drafters.draft_model import DraftModel, draft_loss
    from ..decoding.drafters.medusa import MedusaHeads, medusa_loss
    from .adapters import TrainConfig, batch_indices, lr_at, make_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    sched = TrainConfig(data=args.data, steps=args.steps, warmup_steps=args.warmup_steps, lr=args.lr,
                        batch_size=args.batch_size, max_len=args.max_len, seed=args.seed)
    lm = load(threads=args.threads)
    model = lm.model.requires_grad_(False)
    records = load_dataset(args.data, model_identity=lm.source.identity)
    layers = [int(x) for x in args.draft_layers.split(",") if x.strip()]
    torch.manual_seed(args.seed)
    medusa = MedusaHeads(model.cfg.hidden_size, args.medusa_heads, lm.source.identity)
    draft = DraftModel(model, layers, args.draft_rank, lm.source.identity)
    opts = {"medusa": torch.optim.AdamW(medusa.parameters(), lr=args.lr),
            "draft": torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=args.lr)}
    identity = {k: v for k, v in vars(args).items()
                if k not in ("out", "threads", "no_progress", "checkpoint_every", "stop_at")}
    run = Run(args.out)
    out = run.out
    step, tokens, secs = 0, 0, {"teacher": 0.0, "medusa": 0.0, "draft": 0.0, "wall": 0.0}
    ck = run.checkpoint()
    if ck is not None:
        run.refuse_other_settings(ck["identity"], identity, detail=False)
        medusa.load_state_dict(ck["medusa"])
        draft.load_state_dict(ck["draft"], strict=False)
        for k, o in opts.items():
            o.load_state_dict(ck["opt_" + k])
        step, tokens, secs = ck["step"], ck["tokens"], ck["seconds"]
        run.resumed(step)
    trained = {k for k, v in draft.named_parameters() if v.requires_grad}

    def checkpoint() -> None:
        run.save({"identity": identity, "medusa": medusa.state_dict(),
                  "draft": {k: v for k, v in draft.state_dict().items() if k in trained},
                  **{"opt_" + k: o.state_dict() for k, o in opts.items()},
                  "step": step, "tokens": tokens, "seconds": secs})

    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    last: dict = {}
    t_wall = time.perf_counter()
    wall0 = secs["wall"]

    def train_step(s: int) -> tuple[dict, dict]:
        nonlocal step, tokens, last
        ids, valid = make_batch(records, batch_indices(len(records), s, args.batch_size, args.seed), args.max_len)
        lr = lr_at(s, sched)
        t0 = time.perf_counter()
        with torch.no_grad():
            states, _ = slow_trace(model, ids)
            h = states[-1]
            teacher_logp = torch.log_softmax(model.head(h), -1)
            del states
        t1 = time.perf_counter()
        stats = {}
        for name, fn in (("medusa", lambda: medusa_loss(medusa, model, h, teacher_logp, valid)),
                         ("draft", lambda: draft_loss(draft, ids, teacher_logp, valid))):
            ts = time.perf_counter()
            o = opts[name]
            for g in o.param_groups:
                g["lr"] = lr
            loss, st = fn()
            o.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in o.param_groups for p in g["params"]]
            st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            o.step()
            stats[name] = st
            secs[name] += time.perf_counter() - ts
        secs["teacher"] += t1 - t0
        step = s + 1
        ntok = int(valid.sum())
        tokens += ntok
        secs["wall"] = wall0 + time.perf_counter() - t_wall
        last = {"step": step, "lr": lr, "tokens": ntok, **stats}
        return last, {"medusa": f"{stats['medusa']['loss']:.2f}", "draft": f"{stats['draft']['loss']:.2f}",
                      "draft_agree": f"{stats['draft']['agree']:.2f}"}

    run.steps(step, more=lambda s: s < end, train_step=train_step,
              due=lambda s: s % args.checkpoint_every == 0 or s == end, checkpoint=checkpoint,
              progress=not args.no_progress, bar=dict(total=end, initial=step, desc="train medusa + draft", unit="step"))
    if not last:  # resumed at the end: the last logged step
        last = run.logged(step)
    common = {"command": command_line(), "config": identity, "examples": len(records), "steps": step,
              "schedule_steps": args.steps,
              "tokens_seen": tokens, "shared_teacher_seconds": round(secs["teacher"], 1),
              "wall_seconds_both": round(secs["wall"], 1), "threads": args.threads}
    medusa.training_info = {**common, "own_seconds": round(secs["medusa"], 1), "last_log": last.get("medusa")}
    draft.training_info = {**common, "own_seconds": round(secs["draft"], 1), "last_log": last.get("draft")}
    for name, obj in (("medusa", medusa), ("draft", draft)):
        d = out / name
        obj.save(d, dtype=torch.float32)
        write_draft_vocab(d, records, args.draft_vocab, always=tuple(model.cfg.eos_token_ids))
    print(json.dumps(last), flush=True)
    return 0


def ship(src: str, dst: str) -> Path:
    """Copy a trained peer directory (medusa or draft) into the package as float16."""
    from safetensors.torch import load_file

    from ..artifacts import atomic_write, write_tensors
    s, d = Path(src), Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    for f in s.iterdir():
        if f.suffix == ".safetensors":
            write_tensors(d / f.name, {k: v.half() for k, v in load_file(str(f)).items()})
        elif f.suffix == ".json":
            atomic_write(d / f.name, f.read_bytes())
    return d


if __name__ == "__main__":
    from ..options import run_standalone
    run_standalone("python -m m2r2.training.peers", __doc__.split("\n\n")[0], _add_args, main)
