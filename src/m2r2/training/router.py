"""``m2r2 train-router``: train ARLA, the exit router (``m2r2.stream.router``), for an M2R2 adapter.

Features from the self-distillation data (fast-stream states at sampled response positions and agreement
labels: 1 where the read-out at fast layer l equals the full model's next token), cached resumably beside the
output, then BCE with AdamW, keeping the epoch with the lowest held-out BCE; saved beside the adapter it was
trained for (``router.safetensors`` + ``router.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..artifacts import load_checkpoint, save_checkpoint
from ..stream.router import ARLARouter, RouterConfig


# ---------------------------------------------------------------------------------------------------
# training: features from the self-distillation data, then BCE


@torch.no_grad()
def extract(lm, acc, records: list[dict], positions_per_seq: int, max_len: int, seed: int,
            progress: bool = True) -> dict:
    """Fast-stream states at sampled response positions (N, F, D) and agreement labels (N, F)."""
    from tqdm.auto import tqdm

    from ..stream.accelerator import slow_trace
    from .adapters import make_batch

    model = lm.model
    rng = random.Random(seed)
    F_ = acc.fast_layers
    states, labels = [], []
    for r in tqdm(records, desc="router features", unit="seq", file=sys.stderr, disable=not progress):
        ids, mask = make_batch([r], [0], max_len)
        slow, cache = slow_trace(model, ids)
        fast = acc.parallel_fast_states(model, ids, cache.k, cache.v)
        pos = mask[0].nonzero()[:, 0].tolist()
        pos = sorted(rng.sample(pos, min(positions_per_seq, len(pos))))
        sel = torch.tensor(pos)
        target = model.head(slow[-1][0, sel]).argmax(-1)  # (n,)
        traj = torch.stack([fast[l][0, sel] for l in range(1, F_ + 1)], 1)  # (n, F, D)
        agree = torch.stack([model.head(traj[:, l]).argmax(-1) == target for l in range(F_)], 1)  # (n, F)
        states.append(traj.float())
        labels.append(agree.float())
    return {"states": torch.cat(states), "labels": torch.cat(labels)}


def fit(router: ARLARouter, feats: dict, val: dict, epochs: int = 20, lr: float = 3e-3, batch: int = 256,
        seed: int = 0, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.01)
    X, Y = feats["states"], feats["labels"]
    n = X.shape[0]
    bar = tqdm(range(epochs), desc="router", unit="epoch", file=sys.stderr, disable=not progress)
    hist = []
    best, best_state = None, None
    for ep in bar:
        router.train()
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, batch):
            idx = perm[i: i + batch]
            loss = F.binary_cross_entropy_with_logits(router(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        m = evaluate(router, val)
        hist.append({"epoch": ep + 1, "train_bce": tot / n, **m})
        if best is None or m["val_bce"] < best["val_bce"]:
            best, best_state = hist[-1], {k: v.clone() for k, v in router.state_dict().items()}
        bar.set_postfix(bce=f"{tot / n:.3f}", val_bce=f"{m['val_bce']:.3f}", best_epoch=best["epoch"])
    # keep the epoch with the lowest held-out BCE: the router overfits fast (on the shipped R=2 features,
    # validation BCE 0.315 at epoch 2 against 0.507 at epoch 20, exit precision at 0.9: 0.98 against 0.65)
    router.load_state_dict(best_state)
    router.eval()
    return {"history": hist, "final": best}


@torch.no_grad()
def evaluate(router: ARLARouter, val: dict) -> dict:
    router.eval()
    logits = router(val["states"])
    y = val["labels"]
    p = torch.sigmoid(logits)
    out = {"val_bce": float(F.binary_cross_entropy_with_logits(logits, y)),
           "val_acc": float(((p >= 0.5).float() == y).float().mean()),
           "val_label_rate_by_layer": [round(float(v), 4) for v in y.mean(0)]}
    # precision of "exit" decisions at a few thresholds (how often an exit would be right), per layer mean
    for t in (0.5, 0.7, 0.9):
        ex = p >= t
        out[f"val_exit_rate@{t}"] = float(ex.float().mean())
        out[f"val_exit_precision@{t}"] = float(y[ex].mean()) if bool(ex.any()) else None
    return out


def main(args: argparse.Namespace) -> int:
    import m2r2
    from ..provenance import command_line
    from .data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lm = m2r2.load(args.model, threads=args.threads)
    acc = lm.load_accelerator(args.adapter, rate=args.rate)
    adapter_dir = Path(args.adapter) if args.adapter else None
    if adapter_dir is None:
        from ..stream.accelerator import find_shipped
        adapter_dir = find_shipped(lm.source.identity, args.rate)
    out = Path(args.out) if args.out else adapter_dir
    records = load_dataset(args.data, model_identity=lm.source.identity)
    rng = random.Random(args.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    n_val = max(1, len(order) // 10)
    val_idx, train_idx = order[:n_val], order[n_val:][: args.sequences]
    cache = out / "router_features.pt"
    t0 = time.perf_counter()
    key = {"adapter": str(adapter_dir), "sequences": args.sequences, "positions": args.positions,
           "seed": args.seed, "max_len": args.max_len, "data": str(args.data)}
    feats = None
    if cache.is_file():  # resumable: features are the long part
        saved = load_checkpoint(cache)
        if saved.get("key") == key:
            feats, val = saved["train"], saved["val"]
            print(f"m2r2: reusing router features from {cache}", file=sys.stderr)
    if feats is None:
        feats = extract(lm, acc, [records[i] for i in train_idx], args.positions, args.max_len, args.seed,
                        not args.no_progress)
        val = extract(lm, acc, [records[i] for i in val_idx], args.positions, args.max_len, args.seed + 1,
                      not args.no_progress)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint({"key": key, "train": feats, "val": val}, cache)
    router = ARLARouter(RouterConfig(lm.config.hidden_size, acc.fast_layers, args.latent))
    res = fit(router, feats, val, args.epochs, args.lr, seed=args.seed, progress=not args.no_progress)
    router.cfg.training = {"command": command_line(), "positions": int(feats["labels"].shape[0]),
                           "val_positions": int(val["labels"].shape[0]), "sequences": len(train_idx),
                           "epochs": args.epochs, "wall_seconds": round(time.perf_counter() - t0, 1),
                           "final": res["final"], "best_epoch": res["final"]["epoch"],
                           "val_bce_by_epoch": [round(h["val_bce"], 4) for h in res["history"]]}
    router.save(out)
    print(json.dumps(res["final"]))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..options import float_in, int_at_least
    p = subparsers.add_parser("train-router", help="train ARLA, the exit router, for an M2R2 adapter",
                              description=sys.modules[ARLARouter.__module__].__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="self-distillation data directory (from `m2r2 data`)")
    p.add_argument("--adapter", default=None, help="adapter directory (default: the shipped one for --rate)")
    p.add_argument("--rate", type=int, choices=(2, 3, 4), default=2)
    p.add_argument("--out", default=None, help="where router.* go (default: the adapter directory)")
    p.add_argument("--sequences", type=int_at_least("--sequences", 1), default=300,
                   help="training sequences (default 300)")
    p.add_argument("--positions", type=int_at_least("--positions", 1), default=32,
                   help="response positions sampled per sequence")
    p.add_argument("--max-len", type=int_at_least("--max-len", 2), default=320)
    p.add_argument("--latent", type=int_at_least("--latent", 1), default=64)
    p.add_argument("--epochs", type=int_at_least("--epochs", 1), default=20)
    p.add_argument("--lr", type=float_in("--lr", 0, lo_open=True), default=3e-3)
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int_at_least("--threads", 1), default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p
