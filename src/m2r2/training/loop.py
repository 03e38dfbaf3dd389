"""The one training skeleton behind ``m2r2 train`` (adapters), the peer trainer (Medusa + draft model) and
``m2r2 family-train``: a resumable run in an output directory.

* ``Run``: ``<out>/checkpoint.pt`` (written atomically by ``artifacts.save_checkpoint``, read back by the safe
  ``load_checkpoint``), the refusal of a checkpoint made with other settings, and ``steps``, the step loop:
  the JSONL log (``open_log``: trimmed to the checkpoint's step, so a run killed between checkpoints logs each
  step once), the tqdm bar, and checkpoints at the trainer's cadence, closing both however the loop ends.
* ``cosine``: the shared learning-rate decay; ``warmup_cosine`` the step-based schedule of the adapter and
  peer trainers (the family trainer warms up over a fraction of its FLOP budget and decays with ``cosine``).

Each trainer keeps its own step (a function of the step number: data order is a pure function of seed and
step) and what its checkpoint holds (the family trainer saves torch's RNG state)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from ..artifacts import atomic_write, load_checkpoint, save_checkpoint
from ..errors import M2R2Error

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


def cosine(lr: float, t: float, min_lr_ratio: float) -> float:
    """Cosine decay from ``lr`` at t = 0 to ``min_lr_ratio * lr`` at t >= 1."""
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def warmup_cosine(step: int, steps: int, warmup_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps`` (step 0 already at lr / warmup_steps), then cosine decay to
    ``min_lr_ratio`` of the peak at step ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return cosine(lr, (step - warmup_steps) / max(1, steps - warmup_steps), min_lr_ratio)


def open_log(path: Path, step: int):
    """``path`` (a JSONL training log) opened for appending, keeping only its lines for steps 1..``step``,
    the checkpoint's step (0: none). A run stopped between checkpoints had logged steps that the resumed run
    trains and logs again; without the trim they appear twice (and a line cut off by the stop is dropped)."""
    keep = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line + "\n")
        atomic_write(path, "".join(keep))
    return open(path, "a", encoding="utf-8")


class Run:
    """A resumable training run writing into ``out`` (created); only the ``main`` process writes files."""

    def __init__(self, out: str | Path, error: type[M2R2Error] = M2R2Error, main: bool = True):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path, self.log_path = self.out / CHECKPOINT, self.out / LOG
        self.error, self.main = error, main

    def checkpoint(self) -> dict | None:
        """The saved checkpoint, if any (written atomically: unreadable means damaged or foreign)."""
        return load_checkpoint(self.ckpt_path, self.error) if self.ckpt_path.is_file() else None

    def refuse_other_settings(self, saved: dict, current: dict, detail: bool = True) -> None:
        if saved != current:
            diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            raise self.error(f"{self.out} holds a run with other settings" + (f" ({diff})" if detail else "")
                             + "; pass another --out or delete it")

    def resumed(self, step: int, extra: str = "") -> None:
        if self.main:
            print(f"m2r2: resuming {self.out} at step {step}{extra}", file=sys.stderr)

    def logged(self, step: int) -> dict:
        """The log record of ``step`` ({} if none): what a run resumed at its end reports as its last step."""
        if not self.log_path.is_file():
            return {}
        lines = [json.loads(x) for x in self.log_path.read_text(encoding="utf-8").splitlines() if x.strip()]
        return next((x for x in reversed(lines) if x.get("step") == step), {})

    def save(self, state: dict) -> None:
        if self.main:
            save_checkpoint(state, self.ckpt_path)

    def steps(self, step: int, *, more: Callable[[int], bool], train_step: Callable[[int], tuple[dict, dict]],
              due: Callable[[int], bool], checkpoint: Callable[[], None], bar: dict,
              advance: Callable[[int], int] = lambda bar_n: 1, progress: bool = True) -> int:
        """The step loop from ``step`` while ``more(step)``: ``train_step(step)`` trains one step and returns
        (its log record, holding the new "step", and the bar's postfix); the record is logged, the bar moves
        by ``advance(bar.n)``, and ``checkpoint()`` runs whenever ``due(new step)``. Returns the last step."""
        from tqdm.auto import tqdm

        pbar = tqdm(**bar, file=sys.stderr, disable=not (progress and self.main), dynamic_ncols=True)
        log_f = open_log(self.log_path, step) if self.main else None
        try:
            while more(step):
                rec, postfix = train_step(step)
                step = rec["step"]
                if log_f is not None:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                pbar.set_postfix(**postfix, refresh=False)
                pbar.update(advance(pbar.n))
                if due(step):
                    checkpoint()
        finally:
            pbar.close()
            if log_f is not None:
                log_f.close()
        return step


def accelerate_step(hfacc, module, opt, params, batch: tuple, lr: float, max_grad_norm: float = 1.0) -> dict:
    """One optimizer step of the self-distillation trainers (adapters, EAGLE head, MoE recovery) through Hugging Face
    Accelerate: the learning rate set to ``lr``, ``module(*batch)`` on the accelerator's device -> (loss, stats),
    backward, the gradient norm of ``params`` clipped at ``max_grad_norm`` (0: not clipped) and recorded in the stats
    as ``grad_norm``, the optimizer step. Returns the stats."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss, stats = module(*(t.to(hfacc.device) for t in batch))
    opt.zero_grad(set_to_none=True)
    hfacc.backward(loss)
    if max_grad_norm > 0:
        stats["grad_norm"] = float(hfacc.clip_grad_norm_(params, max_grad_norm))
    opt.step()
    return stats


def distill_run(args, run: Run, hfacc, step_module, opt, params, records: list, *, batch: Callable,
                lr: Callable[[int], float], state: tuple, postfix: Callable[[dict], dict], desc: str) -> dict:
    """The resumable step loop of a self-distillation trainer with one trainable module (the EAGLE head, the MoE
    recovery's deltas), options from ``add_run_args``. The run's settings (``args`` less output, threads, progress,
    cadence, stop) must match a checkpoint it resumes; ``state`` = (checkpoint key, the trainable state
    of the unwrapped module, a function loading that state) restores the module before Accelerate wraps it;
    ``batch(step, rank, world)`` -> (ids, valid) is this process's share of a step's batch, ``lr(step)`` its learning
    rate; ``postfix(stats)`` the progress bar's. Returns the training record an artifact keeps: command, settings,
    examples, steps, tokens seen, wall time, threads, processes and the last log line."""
    import time

    from ..provenance import command_line
    key, save_state, load_state = state
    identity = {k: v for k, v in vars(args).items()
                if k not in ("out", "threads", "no_progress", "checkpoint_every", "stop_at")}
    step, tokens, wall_before = 0, 0, 0.0
    ck = run.checkpoint()
    if ck is not None:
        run.refuse_other_settings(ck["identity"], identity, detail=False)
        load_state(ck[key])
        opt.load_state_dict(ck["opt"])
        step, tokens, wall_before = ck["step"], ck["tokens"], ck["wall_seconds"]
        run.resumed(step)
    module, opt = hfacc.prepare(step_module, opt)
    t_start = time.perf_counter()
    rank, world = hfacc.process_index, hfacc.num_processes

    def checkpoint() -> None:
        hfacc.wait_for_everyone()
        run.save({"identity": identity, key: save_state(hfacc.unwrap_model(module)), "opt": opt.state_dict(),
                  "step": step, "tokens": tokens, "wall_seconds": wall_before + time.perf_counter() - t_start})

    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    last: dict = {}

    def train_step(s: int) -> tuple[dict, dict]:
        nonlocal step, tokens, last
        ids, valid = batch(s, rank, world)
        rate = lr(s)
        st = accelerate_step(hfacc, module, opt, params, (ids, valid), rate)
        step = s + 1
        ntok = int(valid.sum()) * world
        tokens += ntok
        last = {"step": step, "lr": rate, "tokens": ntok, **st}
        return last, postfix(st)

    module.train()
    run.steps(step, more=lambda s: s < end, train_step=train_step,
              due=lambda s: s % args.checkpoint_every == 0 or s == end, checkpoint=checkpoint,
              progress=not args.no_progress, bar=dict(total=end, initial=step, desc=desc, unit="step"))
    if not last:  # resumed at the end: the last logged step
        last = run.logged(step)
    return {"command": command_line(), "config": identity, "examples": len(records), "steps": step,
            "schedule_steps": args.steps, "tokens_seen": tokens,
            "wall_seconds": round(wall_before + time.perf_counter() - t_start, 1), "threads": args.threads,
            "processes": world, "last_log": last}


def add_run_args(p, *, out: str, steps: int, warmup_steps: int, lr: float, checkpoint_every: int,
                 draft_vocab: bool = True) -> None:
    """The options the self-distillation trainers share (``m2r2.training.peers``, ``.eagle``, ``m2r2.moe.recover``):
    data, output, the adapters' batches and schedule (``m2r2.training.adapters.batch_indices`` / ``make_batch``), the
    draft vocabulary (``draft_vocab``: for trainers whose artifact reads out over one), checkpoints and stopping,
    threads, progress."""
    from ..options import float_in, int_at_least
    p.add_argument("--data", required=True, help="self-distillation data directory (from `m2r2 data`)")
    p.add_argument("--out", default=out)
    p.add_argument("--steps", type=int_at_least("--steps", 1), default=steps)
    p.add_argument("--warmup-steps", type=int_at_least("--warmup-steps", 0), default=warmup_steps)
    p.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=4)
    p.add_argument("--max-len", type=int_at_least("--max-len", 2), default=320)
    p.add_argument("--lr", type=float_in("--lr", 0, lo_open=True), default=lr)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    if draft_vocab:
        p.add_argument("--draft-vocab", type=int_at_least("--draft-vocab", 1), default=4096)
    p.add_argument("--checkpoint-every", type=int_at_least("--checkpoint-every", 1), default=checkpoint_every)
    p.add_argument("--stop-at", type=int_at_least("--stop-at", 0), default=None,
                   help="end the run at this step and export (the schedule still spans --steps)")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None)
    p.add_argument("--no-progress", action="store_true")
