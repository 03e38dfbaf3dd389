"""``m2r2 train``: train M2R2 accelerator adapters on a frozen model by self-distillation.

    m2r2 data --n 1024 --out runs/distill                  # the base model's own responses
    m2r2 train --data runs/distill --out runs/adapter-r2   # adapters for rate 2
    accelerate launch -m m2r2.training.adapters --data ... --out ...   # the same on many processes / GPUs

Training runs through Hugging Face Accelerate: the adapters (the only trainable parameters) are wrapped
for data parallelism, each process takes its share of every global batch, and only the main process
writes files. State (adapters, optimizer, schedule, step) is checkpointed atomically every
``--checkpoint-every`` steps; re-running the same command resumes from the last checkpoint, and a
different configuration in the same ``--out`` is refused. Data order is a pure function of (seed, step),
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..stream.accelerator import Accelerator as M2R2Accelerator
from ..stream.accelerator import LossWeights, distill_loss
from ..provenance import command_line
from ..errors import M2R2Error
from ..artifacts import write_draft_vocab
from .loop import Run, accelerate_step, warmup_cosine


class TrainError(M2R2Error):
    """Training cannot start or resume as asked."""


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/adapter-r2"
    model: str | None = None
    rate: int = 2
    rank: int = 128
    output_scale: str = "rms"  # adapter output scaled by its input's RMS ("rms") or not ("none")
    kind: str = "m2r2"  # "m2r2" (fast stream) or "exit" (one exit adapter at depth ceil(L/R): a peer)
    sees_slow: bool = False  # the fast stream also reads the slow stream's previous final state (m2r2-eagle)
    init_from: str | None = None  # start from this trained adapter's weights (same rate, rank, kind)
    draft_vocab: int = 4096  # size of the frequent-token draft vocabulary written beside the adapter
    steps: int = 500
    batch_size: int = 4  # sequences per global batch
    max_len: int = 320  # tokens per sequence (prompt + response, truncated)
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    align_weight: float = 1.0
    kl_weight: float = 1.0
    kl_layers: tuple[int, ...] = ()  # () = the last fast layer
    seed: int = 0
    checkpoint_every: int = 25
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "rank", "checkpoint_every", "draft_vocab"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.kind not in ("m2r2", "exit"):
            raise TrainError(f"--kind must be m2r2 or exit, got {self.kind!r}")
        if self.sees_slow and self.kind != "m2r2":
            raise TrainError("--sees-slow needs --kind m2r2")
        if self.rate not in (2, 3, 4):
            raise TrainError(f"--rate must be 2, 3 or 4, got {self.rate}")
        self.kl_layers = tuple(int(x) for x in self.kl_layers)

    def identity(self) -> dict:
        """The settings a resumed run must share (everything but where and how fast it runs)."""
        d = asdict(self)
        for k in ("out", "threads", "checkpoint_every", "steps", "draft_vocab"):
            d.pop(k)
        return d


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at the last step."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of global batch ``step``: epochs are seeded permutations of range(n)."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = min(batch_size - len(out), n - off)
        out += perm[off:off + take]
        pos += take
    return out


def make_batch(records: list[dict], idx: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) of prompt + response (the response cut to fit ``max_len``; the prompt's
    tail is kept when the prompt alone is too long) and the loss mask (B, T): the last prompt position
    and every response position, i.e. where the fast stream will have to draft."""
    seqs, starts = [], []
    for i in idx:
        p, r = records[i]["prompt_ids"], records[i]["response_ids"]
        if len(p) >= max_len:
            p = p[-(max_len // 2):]
        seqs.append((p + r)[:max_len])
        starts.append(len(p) - 1)
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (s, st) in enumerate(zip(seqs, starts)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, st: len(s)] = True
    return ids, mask


class _Distill(nn.Module):
    """Frozen backbone + trainable adapters as one module, so Accelerate can wrap it for data parallelism
    (only the adapters require gradients, so only they are synchronised)."""

    def __init__(self, backbone, acc: M2R2Accelerator, weights: LossWeights):
        super().__init__()
        self.backbone, self.acc, self.weights = backbone, acc, weights

    def forward(self, ids, valid):
        return distill_loss(self.backbone, self.acc, ids, valid, self.weights)


def init_from(acc: M2R2Accelerator, path: str, model, identity: str) -> None:
    """Start ``acc`` from the trained adapter in ``path`` (the same base model, rate, rank, kind and output scale):
    every weight it has; a seer it lacks starts untrained (adding nothing), so a fast stream that sees the slow one
    can continue a plain one's training."""
    src = M2R2Accelerator.load(path, model, identity)
    a, b = src.cfg, acc.cfg
    if (a.rate, a.rank, a.kind, a.output_scale) != (b.rate, b.rank, b.kind, b.output_scale):
        raise TrainError(f"--init-from {path}: rate {a.rate}, rank {a.rank}, kind {a.kind}, output scale "
                         f"{a.output_scale}; this run has {b.rate}, {b.rank}, {b.kind}, {b.output_scale}")
    if a.sees_slow and not b.sees_slow:
        raise TrainError(f"--init-from {path}: that adapter sees the slow stream; add --sees-slow")
    missing, unexpected = acc.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any(not k.startswith("seer.") for k in missing):  # (the same settings: the same names)
        raise TrainError(f"--init-from {path}: its weights do not match this run's ({(missing + unexpected)[:3]})")


def train(cfg: TrainConfig, lm=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) adapters as ``cfg`` says; writes ``cfg.out``/adapter.{safetensors,json}.
    ``stop_after`` ends this call after that many steps (as if interrupted; tests use it)."""
    from accelerate import Accelerator as HFAccelerator
    from .data import load_dataset

    hfacc = HFAccelerator(cpu=not torch.cuda.is_available())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if lm is None:
        from ..api import load
        lm = load(cfg.model, threads=cfg.threads)
    model = lm.model.to(hfacc.device)
    records = load_dataset(cfg.data, model_identity=lm.source.identity)
    if len(records) < cfg.batch_size:
        raise TrainError(f"{cfg.data} has {len(records)} examples, fewer than --batch-size {cfg.batch_size}")
    run = Run(cfg.out, TrainError, main=hfacc.is_main_process)
    out = run.out

    torch.manual_seed(cfg.seed)
    acc = M2R2Accelerator.for_model(model, lm.source.identity, rate=cfg.rate, rank=cfg.rank,
                                    output_scale=cfg.output_scale, kind=cfg.kind,
                                    sees_slow=cfg.sees_slow).to(hfacc.device)
    if cfg.init_from:
        init_from(acc, cfg.init_from, model, lm.source.identity)
    F_ = acc.fast_layers
    bad = [l for l in cfg.kl_layers if not 1 <= l <= F_]
    if bad:
        raise TrainError(f"--kl-layers {bad} outside the fast stream's layers 1..{F_}")
    opt = torch.optim.AdamW(acc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    wall_before = 0.0
    tokens_seen_total = 0
    ck = run.checkpoint()
    if ck is not None:
        # settings added after a checkpoint was written count as their defaults
        saved = {**{k: v for k, v in TrainConfig(data=cfg.data).identity().items() if k not in ck.get("config", {})},
                 **ck.get("config", {})}
        run.refuse_other_settings(saved, cfg.identity())
        acc.load_state_dict(ck["adapters"])
        opt.load_state_dict(ck["optimizer"])
        step, wall_before, tokens_seen_total = ck["step"], ck.get("wall_seconds", 0.0), ck.get("tokens_seen", 0)
        run.resumed(step)
    module = _Distill(model, acc, LossWeights(cfg.align_weight, cfg.kl_weight, cfg.kl_layers))
    module, opt = hfacc.prepare(module, opt)

    def checkpoint(final: bool = False) -> None:
        hfacc.wait_for_everyone()
        if not hfacc.is_main_process:
            return
        adapters = hfacc.unwrap_model(module).acc
        run.save({"config": cfg.identity(), "adapters": adapters.state_dict(), "optimizer": opt.state_dict(),
                  "step": step, "tokens_seen": tokens_seen_total,
                  "wall_seconds": wall_before + time.perf_counter() - t_start})
        if final:
            adapters.cfg.training = {
                "command": command_line(),
                "config": asdict(cfg), "examples": len(records), "steps": step,
                "tokens_seen": tokens_seen_total, "wall_seconds": round(wall_before + time.perf_counter() - t_start, 1),
                "processes": hfacc.num_processes, "last_log": last,
            }
            adapters.save(out)
            write_draft_vocab(out, records, cfg.draft_vocab, always=tuple(lm.model.cfg.eos_token_ids))

    rank, world = hfacc.process_index, hfacc.num_processes
    t_start = time.perf_counter()
    last: dict = {}
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    tok_window, t_window = 0, time.perf_counter()

    def train_step(s: int) -> tuple[dict, dict]:
        nonlocal step, tok_window, tokens_seen_total, last
        idx = batch_indices(len(records), s, cfg.batch_size, cfg.seed)[rank::world]
        ids, valid = make_batch(records, idx, cfg.max_len)
        stats = accelerate_step(hfacc, module, opt, module.parameters(), (ids, valid), lr_at(s, cfg), cfg.max_grad_norm)
        step = s + 1
        ntok = int(valid.sum()) * world
        tok_window += ntok
        tokens_seen_total += ntok
        last = {"step": step, "lr": lr_at(step - 1, cfg), **stats, "tokens": ntok}
        now = time.perf_counter()
        agree = stats["agree"].get(max(stats["agree"])) if stats["agree"] else None
        return last, {"loss": f"{stats['loss']:.3f}", "kl": f"{stats['kl']:.3f}", "agree": f"{agree:.2f}",
                      "tok_s": f"{tok_window / max(now - t_window, 1e-9):.0f}"}

    def periodic() -> None:
        nonlocal tok_window, t_window
        checkpoint()
        tok_window, t_window = 0, time.perf_counter()

    module.train()
    run.steps(step, more=lambda s: s < end, train_step=train_step, due=lambda s: s % cfg.checkpoint_every == 0
              and s < cfg.steps, checkpoint=periodic, progress=progress,
              bar=dict(total=cfg.steps, initial=step, desc=f"train {cfg.kind} R={cfg.rate}", unit="step"))
    checkpoint(final=step >= cfg.steps)
    return {"step": step, "done": step >= cfg.steps, "last": last, "out": str(out)}


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..options import float_in, int_at_least, int_list
    d = TrainConfig(data="")
    p.add_argument("--data", required=True, help="self-distillation data directory (from `m2r2 data`)")
    p.add_argument("--out", default=d.out, help=f"output directory (default: {d.out}); re-run to resume")
    p.add_argument("--model", default=None, help="model directory, .gguf or hub id (default: embedded)")
    p.add_argument("--rate", type=int, choices=(2, 3, 4), default=d.rate, help=f"(default: {d.rate})")
    at_least = {"rank": 1, "steps": 1, "batch_size": 1, "max_len": 2, "warmup_steps": 0, "seed": 0,
                "checkpoint_every": 1, "draft_vocab": 1}
    for name in ("rank", "steps", "batch_size", "max_len", "lr", "warmup_steps", "weight_decay", "max_grad_norm",
                 "align_weight", "kl_weight", "seed", "checkpoint_every", "draft_vocab"):
        flag = "--" + name.replace("_", "-")
        # lr > 0; the weights and the clipping norm >= 0 (max_grad_norm 0 turns clipping off)
        typ = int_at_least(flag, at_least[name]) if name in at_least else float_in(flag, 0, lo_open=name == "lr")
        p.add_argument(flag, type=typ, default=getattr(d, name), help=f"(default: {getattr(d, name)})")
    p.add_argument("--kind", choices=("m2r2", "exit"), default=d.kind,
                   help="m2r2: accelerator adapters (default); exit: one exit adapter at depth ceil(L/R) on the "
                        "unchanged model (the Kangaroo/DEED-style peer, same data and budget)")
    p.add_argument("--sees-slow", action="store_true",
                   help="the fast stream's input also reads the slow stream's final state at the previous position "
                        "(the m2r2-eagle variant)")
    p.add_argument("--init-from", default=None,
                   help="start from this trained adapter directory (same rate, rank, kind; a seer it lacks starts "
                        "untrained)")
    p.add_argument("--output-scale", choices=("rms", "none"), default=d.output_scale,
                   help=f"scale each adapter's output by its input's RMS (default: {d.output_scale})")
    p.add_argument("--kl-layers", type=int_list("--kl-layers", 1), default=(),
                   help="1-based fast layers with a KL term (default: the last fast layer)")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None,
                   help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**kw)
    res = train(cfg, progress=not args.no_progress)
    print(json.dumps(res["last"]), flush=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train accelerator adapters by self-distillation (resumable)",
                              description=__doc__.split("\n\n")[0])
    _add_args(p)
    p.set_defaults(func=main)
    return p


if __name__ == "__main__":
    from ..options import run_standalone
    run_standalone("python -m m2r2.training.adapters", __doc__.split("\n\n")[0], _add_args, main)
