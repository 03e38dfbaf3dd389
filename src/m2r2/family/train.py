"""``m2r2 family-train``: train one family architecture from scratch to a training-FLOP budget.

    m2r2 family-train --arch mor-ec --budget 1e13 --out runs/family/mor-ec --threads 1

The budget is in FLOPs as the model's own counter measures them (3x the forward: forward + backward), so
every architecture gets the same compute, not the same steps: a model that routes tokens past blocks
takes more steps on more tokens. The learning-rate schedule (warm-up, cosine) runs over the fraction of
the budget spent, so it ends where the budget does whatever an architecture costs per step.

Same conventions as ``m2r2 train``: seeded, tqdm bar with rate/ETA, data order a pure function of
(seed, step), atomic checkpoints (``m2r2.training.loop``) every ``--checkpoint-every`` steps, re-running
the same command resumes bit-exactly, a different configuration in the same ``--out`` is refused, and
the loop runs through Hugging Face Accelerate (so ``accelerate launch`` spreads batches over processes).
Output: ``model.safetensors`` + ``config.json`` (architecture, training record).

Designated tokens in training: the first half of every window (the "document" a long prompt carries),
so p-MoD and VideoLLM-MoD learn to route over a context span and the answer half is always dense.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..provenance import command_line
from ..errors import M2R2Error
from ..artifacts import load_artifact, save_artifact, shapes_of
from ..training.loop import Run, cosine
from .data import TokenData
from .model import ARCHS, Counter, FamilyConfig, FamilyModel

class FamilyTrainError(M2R2Error):
    """Family training cannot start or resume as asked."""


@dataclass
class FamilyTrainConfig:
    arch: str = "vanilla"
    data: str = "runs/family/data"
    out: str = "runs/family/vanilla"
    budget: float = 1e13  # training FLOPs (forward x 3)
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: float = 0.03  # fraction of the budget
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    ffn: int = 352
    recursions: int = 3
    checkpoint_every: int = 50
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise FamilyTrainError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not self.budget > 0 or not self.lr > 0:
            raise FamilyTrainError("--budget and --lr must be > 0")
        for name in ("batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise FamilyTrainError(f"--{name.replace('_', '-')} must be >= 1")

    def model_config(self, vocab_size: int) -> FamilyConfig:
        return FamilyConfig(arch=self.arch, vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                            n_heads=self.n_heads, ffn=self.ffn, recursions=self.recursions,
                            max_len=max(1024, 2 * self.seq_len))

    def identity(self) -> dict:
        d = asdict(self)
        for k in ("out", "threads", "checkpoint_every", "budget"):
            d.pop(k)
        return d


def lr_at(spent: float, cfg: FamilyTrainConfig) -> float:
    """Linear warm-up over the first ``warmup`` of the budget, then cosine to ``min_lr_ratio``."""
    f = spent / cfg.budget
    if f < cfg.warmup:
        return cfg.lr * max(f / cfg.warmup, 0.01)
    return cosine(cfg.lr, min(1.0, (f - cfg.warmup) / max(1e-9, 1 - cfg.warmup)), cfg.min_lr_ratio)


def designated_mask(batch: int, seq_len: int) -> torch.Tensor:
    """The token-type mask used in training and validation: the first half of each window."""
    m = torch.zeros(batch, seq_len, dtype=torch.bool)
    m[:, : seq_len // 2] = True
    return m


def lm_loss(model: FamilyModel, window: torch.Tensor, mode: str, counter: Counter | None = None):
    """(cross-entropy per position (B, T), aux loss) for windows (B, T+1)."""
    ids, tgt = window[:, :-1], window[:, 1:]
    logits, aux = model(ids, designated_mask(*ids.shape), mode=mode, counter=counter)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="none")
    return ce.view(ids.shape), aux


def save_model(model: FamilyModel, out: Path, training: dict) -> None:
    save_artifact(out, "model", model.state_dict(), {"family": model.cfg.to_dict(), "training": training},
                  config_name="config.json")


def load_model(path: str | Path) -> FamilyModel:
    """A trained family model from its directory (``config.json`` + ``model.safetensors``)."""
    (model, meta), sd = load_artifact(path, "model", "trained family model", config_name="config.json",
                                      parse=lambda meta: (FamilyModel(FamilyConfig(**meta["family"])), meta),
                                      expected=lambda c: shapes_of(c[0]), error=FamilyTrainError)
    model.load_state_dict(sd)
    model.training_record = meta.get("training", {})
    return model.eval()


def train(cfg: FamilyTrainConfig, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) ``cfg.arch`` until ``cfg.budget`` training FLOPs are spent."""
    from accelerate import Accelerator as HFAccelerator

    hfacc = HFAccelerator(cpu=not torch.cuda.is_available())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = TokenData(cfg.data)
    run = Run(cfg.out, FamilyTrainError, main=hfacc.is_main_process)
    out = run.out
    torch.manual_seed(cfg.seed)
    model = FamilyModel(cfg.model_config(data.manifest["vocab_size"]))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step, spent, tokens, wall_before = 0, 0.0, 0, 0.0
    last_saved: dict = {}
    ck = run.checkpoint()
    if ck is not None:
        run.refuse_other_settings(ck["config"], cfg.identity())
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, spent, tokens, wall_before = ck["step"], ck["flops"], ck["tokens"], ck["wall_seconds"]
        torch.set_rng_state(ck["rng"])
        last_saved = ck.get("last", {})
        run.resumed(step, f" ({spent / cfg.budget:.0%} of the budget)")
    model, opt = hfacc.prepare(model, opt)
    raw = hfacc.unwrap_model(model)
    t_start = time.perf_counter()
    last: dict = dict(last_saved)

    def checkpoint(final: bool = False) -> None:
        hfacc.wait_for_everyone()
        if not hfacc.is_main_process:
            return
        wall = wall_before + time.perf_counter() - t_start
        run.save({"config": cfg.identity(), "model": raw.state_dict(), "optimizer": opt.state_dict(),
                  "step": step, "flops": spent, "tokens": tokens, "wall_seconds": wall,
                  "rng": torch.get_rng_state(), "last": last})
        if final:
            save_model(raw, out, {"command": command_line(), "config": asdict(cfg), "steps": step,
                                  "train_flops": spent, "tokens": tokens, "wall_seconds": round(wall, 1),
                                  "unique_parameters": raw.unique_parameters(), "last_log": last})

    rank, world = hfacc.process_index, hfacc.num_processes
    done_steps = 0

    def train_step(s: int) -> tuple[dict, dict]:
        nonlocal step, spent, tokens, last, done_steps
        window = data.batch("train", s, cfg.batch_size, cfg.seq_len, cfg.seed)[rank::world]
        lr = lr_at(spent, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        c = Counter()
        ce, aux = lm_loss(raw if world == 1 else model, window, "topk", c)
        loss = ce.mean() + aux
        opt.zero_grad(set_to_none=True)
        hfacc.backward(loss)
        gn = float(hfacc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)) if cfg.max_grad_norm > 0 else 0.0
        opt.step()
        step = s + 1
        done_steps += 1
        flops = 3.0 * c.flops * world
        spent += flops
        tokens += c.tokens * world
        last = {"step": step, "lr": lr, "loss": float(ce.mean()), "aux": float(aux.detach()), "grad_norm": gn,
                "flops": spent, "tokens": tokens}
        return last, {"loss": f"{last['loss']:.3f}", "step": step}

    model.train()
    run.steps(step, more=lambda s: spent < cfg.budget and (stop_after is None or done_steps < stop_after),
              train_step=train_step, due=lambda s: s % cfg.checkpoint_every == 0 and spent < cfg.budget,
              checkpoint=checkpoint, advance=lambda n: round(spent / 1e9) - n, progress=progress,
              bar=dict(total=round(cfg.budget / 1e9), initial=round(spent / 1e9), desc=f"train {cfg.arch}",
                       unit="GFLOP"))
    checkpoint(final=spent >= cfg.budget)
    return {"step": step, "done": spent >= cfg.budget, "last": last, "out": str(out)}


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..options import float_in, int_at_least
    d = FamilyTrainConfig()
    p.add_argument("--arch", choices=ARCHS, default=d.arch)
    p.add_argument("--out", default=None, help="output directory (default: runs/family/<arch>); re-run to resume")
    for f in fields(FamilyTrainConfig):
        if f.name in ("arch", "out", "threads"):
            continue
        v, flag = getattr(d, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, int):  # counts and sizes >= 1, the seed >= 0
            typ = int_at_least(flag, 0 if f.name == "seed" else 1)
        elif isinstance(v, float):  # budget and lr > 0, the fractions within [0, 1], the rest >= 0
            hi = 1 if f.name in ("warmup", "min_lr_ratio") else None
            typ = float_in(flag, 0, hi, lo_open=f.name in ("budget", "lr"))
        else:
            typ = type(v)
        p.add_argument(flag, type=typ, default=v, help=f"(default: {v})")
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=1, help="CPU threads (default: 1)")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in vars(args).items() if k in FamilyTrainConfig.__dataclass_fields__}
    if kw.get("out") is None:
        kw["out"] = f"runs/family/{kw['arch']}"
    res = train(FamilyTrainConfig(**kw), progress=not args.no_progress)
    print(json.dumps(res["last"]), flush=True)
    return 0
