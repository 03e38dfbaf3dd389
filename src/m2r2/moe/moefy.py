"""MoEfication: a real Mixture-of-Experts built from the embedded dense model (Zhang et al., 2022).

No small MoE language model ships in any package we can reach, so m2r2 makes one. Per layer:

1. **Statistics.** The dense model runs over the self-distillation data (ShareGPT prompts + the model's own
   answers, ``data/distill-smollm2-135m``; never the evaluation prompt sets); forward hooks record, at
   sampled positions, the FFN input ``h = post_norm(x)`` and the gated activation ``a = silu(g) * u``.
2. **Balanced clustering.** Each neuron is described by its activation magnitudes ``|a|`` over the
   sampled tokens (unit-normalised); balanced k-means (a greedy capacity-constrained assignment per
   iteration) groups neurons that fire together into E experts of exactly ``intermediate / E`` neurons.
   Equal sizes matter: an expert is the unit of transfer, and the memory budget counts slots.
3. **Routers.** An expert's importance for a token is the norm of its contribution to the FFN output,
   ``||down_e a_e||``; a linear router per layer predicts it from ``h`` by ridge regression in closed form
   (no learning rate; streamed normal equations, like ``m2r2.baselines.mod``). At run time the top-k experts by
   predicted importance run and their outputs are summed: all E selected is exactly the dense FFN.

SwiGLU activations are not sparse like the ReLU ones MoEfication was designed for, so quality falls
faster with small k; ``evaluate`` measures it (perplexity on held-out distillation records, Rouge-L of
greedy outputs against the dense model on MT-Bench) and the defaults are chosen from those numbers.

The artifacts are small (neuron permutation + router weights, ~1 MB) and ship in the package; the
experts themselves are a permutation of the dense weights, rebuilt at load time, so no copy of the
weights is stored in git.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import AdapterError
from ..artifacts import check_tensors, find_shipped as find_artifact, load_artifact, save_artifact, shipped_roots
from .layers import MoEBlock, MoEFFN, MoEModel, MoESpec, pack_expert, quantize_expert

MOEFY_FORMAT = 1


@dataclass
class MoEfyConfig:
    num_experts: int = 8
    top_k: int = 2
    sequences: int = 96  # distillation records used for statistics and routers
    max_len: int = 192  # tokens per record (prompt + response)
    positions_per_seq: int = 96  # sampled positions per record
    kmeans_iters: int = 15
    ridge: float = 1.0
    seed: int = 0
    heldout_every: int = 6  # every 6th record is held out (router checks, perplexity)


def load_records(data_dir: str | os.PathLike) -> list[dict]:
    d = Path(data_dir)
    files = sorted(d.glob("shard-*.jsonl"))
    if not files:
        raise AdapterError(f"{d} has no shard-*.jsonl (make it with `m2r2 data`)")
    recs = []
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                recs.append(json.loads(line))
    return recs


def split_records(recs: list[dict], every: int) -> tuple[list[dict], list[dict]]:
    train = [r for i, r in enumerate(recs) if i % every]
    held = [r for i, r in enumerate(recs) if not i % every]
    return train, held


def _ids(r: dict, max_len: int) -> torch.Tensor:
    return torch.tensor((r["prompt_ids"] + r["response_ids"])[:max_len], dtype=torch.long)


@torch.inference_mode()
def collect(model, records: list[dict], cfg: MoEfyConfig, desc: str = "statistics"):
    """Per layer: FFN inputs H (M, D) and activations A (M, I) at sampled positions, float16."""
    L = model.cfg.num_layers
    H: list[list[torch.Tensor]] = [[] for _ in range(L)]
    A: list[list[torch.Tensor]] = [[] for _ in range(L)]
    rng = random.Random(cfg.seed)
    sel: dict = {}

    def hooks(i):
        blk = model.layers[i]

        def on_gate_up(mod, inp, out):
            H[i].append(inp[0][0, sel["pos"]].half())

        def on_down(mod, inp, out):
            A[i].append(inp[0][0, sel["pos"]].half())
        return [blk.gate_up.register_forward_hook(on_gate_up), blk.down.register_forward_hook(on_down)]

    handles = [h for i in range(L) for h in hooks(i)]
    try:
        for r in tqdm(records, desc=desc, unit="seq"):
            ids = _ids(r, cfg.max_len)
            T = len(ids)
            sel["pos"] = torch.tensor(sorted(rng.sample(range(T), min(T, cfg.positions_per_seq))))
            cache = model.new_cache(1, T)
            model(ids.view(1, -1), cache, torch.arange(T).view(1, -1), last_only=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(h) for h in H], [torch.cat(a) for a in A]


def balanced_kmeans(feat: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """feat (N, M) unit rows -> cluster id per row (N,), every cluster exactly N / k rows."""
    N = feat.shape[0]
    cap = N // k
    g = torch.Generator().manual_seed(seed)
    cent = feat[torch.randperm(N, generator=g)[:k]].clone()
    assign = torch.zeros(N, dtype=torch.long)
    for _ in range(iters):
        sims = feat @ cent.t()  # (N, k)
        # greedy capacity-constrained assignment: rows with the clearest preference first
        top2 = sims.topk(2, -1).values
        order = torch.argsort(top2[:, 0] - top2[:, 1], descending=True).tolist()
        count = [0] * k
        pref = torch.argsort(sims, -1, descending=True).tolist()
        new = torch.empty(N, dtype=torch.long)
        for r in order:
            for c in pref[r]:
                if count[c] < cap:
                    new[r] = c
                    count[c] += 1
                    break
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            m = feat[assign == c].mean(0)
            cent[c] = m / m.norm().clamp_min(1e-8)
    return assign


def cluster_layer(A: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """A (M, I) activations -> (k, I/k) neuron indices per expert (sorted within an expert)."""
    feat = A.float().abs().t()  # (I, M)
    feat = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    assign = balanced_kmeans(feat, k, iters, seed)
    return torch.stack([torch.nonzero(assign == c)[:, 0] for c in range(k)])


def expert_importance(A: torch.Tensor, down: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """||down_e a_e|| per token and expert: (M, E). down (D, I) dense."""
    out = []
    for idx in perm:
        out.append((A[:, idx].float() @ down[:, idx].t()).norm(dim=-1))
    return torch.stack(out, -1)


def fit_router(H: torch.Tensor, Y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of Y (M, E) on [H, 1] (M, D+1): weight (E, D), bias (E,)."""
    X = torch.cat([H.double(), torch.ones(H.shape[0], 1, dtype=torch.float64)], 1)
    G = X.t() @ X
    G += ridge * torch.eye(G.shape[0], dtype=torch.float64)
    G[-1, -1] -= ridge  # the bias is not shrunk
    W = torch.linalg.solve(G, X.t() @ Y.double())  # (D+1, E)
    return W[:-1].t().float().contiguous(), W[-1].float().contiguous()


def topk_recall(pred: torch.Tensor, true: torch.Tensor, k: int) -> float:
    p = pred.topk(k, -1).indices
    t = true.topk(k, -1).indices
    hit = (p.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).float().sum(-1)
    return float(hit.mean() / k)


# ---------------------------------------------------------------- artifacts

@dataclass
class MoEfyArtifacts:
    spec: MoESpec
    perm: torch.Tensor  # (L, E, n) neuron ids per expert
    router_w: torch.Tensor  # (L, E, D)
    router_b: torch.Tensor  # (L, E)
    base_identity: str = ""
    info: dict = field(default_factory=dict)
    # recovery deltas (``m2r2.moe.recover``): gu_a (L, r, D), gu_b (L, 2I, r), down_a (L, r, I), down_b (L, D, r)
    lora: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        return save_artifact(path, "moe", {"perm": self.perm.to(torch.int32), "router_w": self.router_w,
                                           "router_b": self.router_b, **{f"lora.{k}": v for k, v in self.lora.items()}},
                             {"format": MOEFY_FORMAT, "kind": "moefy", "spec": self.spec.to_dict(),
                              "base_identity": self.base_identity, "info": self.info})

    @classmethod
    def load(cls, path: str | os.PathLike, identity: str | None = None) -> "MoEfyArtifacts":
        d = Path(path)

        def validate(raw: dict) -> None:
            if raw.get("format") != MOEFY_FORMAT:
                raise AdapterError(f"{d}: format {raw.get('format')} is not supported (expected {MOEFY_FORMAT})")

        (spec, raw), t = load_artifact(d, "moe", "MoEfication", parse=lambda raw: (MoESpec(**raw["spec"]), raw),
                                       identity=identity, validate=lambda c: validate(c[1]))
        L = t["perm"].shape[0] if "perm" in t else 0
        E, n, D = spec.num_experts, spec.expert_size, spec.hidden_size
        I = E * n
        shapes = {"perm": (L, E, n), "router_w": (L, E, D), "router_b": (L, E)}
        if any(k.startswith("lora.") for k in t):
            r = t["lora.gu_a"].shape[1] if "lora.gu_a" in t and t["lora.gu_a"].dim() == 3 else 0
            shapes.update({"lora.gu_a": (L, r, D), "lora.gu_b": (L, 2 * I, r), "lora.down_a": (L, r, I),
                           "lora.down_b": (L, D, r)})
        check_tensors(d / "moe.safetensors", t, shapes)
        lora = {k[5:]: v for k, v in t.items() if k.startswith("lora.")}
        return cls(spec, t["perm"].long(), t["router_w"], t["router_b"], raw.get("base_identity", ""),
                   raw.get("info", {}), lora)


def shipped_dir() -> Path:
    return shipped_roots()[1]


def find_shipped(identity: str, num_experts: int = 16) -> Path | None:
    return find_artifact(identity, "moefy", where=lambda raw: raw["spec"]["num_experts"] == num_experts)


def fold(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, deltas: dict[str, torch.Tensor], i: int):
    """Layer i's dense gate (I, D), up (I, D), down (D, I) with the recovery deltas added."""
    I = gate.shape[0]
    dgu = deltas["gu_b"][i].float() @ deltas["gu_a"][i].float()
    ddown = deltas["down_b"][i].float() @ deltas["down_a"][i].float()
    return gate + dgu[:I].to(gate.dtype), up + dgu[I:].to(up.dtype), down + ddown.to(down.dtype)


def apply(model, art: MoEfyArtifacts, expert_format: str | None = None) -> MoEModel:
    """Turn a dense ``Transformer`` into an ``MoEModel`` in place: every block's FFN becomes an MoEFFN whose
    experts are the artifact's neuron groups (the dense gate/up/down weights are freed), with the recovery
    deltas folded in if the artifact has them. ``expert_format`` (``layers.EXPERT_FORMATS``; default the spec's):
    "f32" keeps each expert's float weights, "q8_0" / "q4_1" store them as GGUF blocks (~1/4 and ~1/6 of the bytes to move
    between memories; what every path then computes from)."""
    import dataclasses
    c = model.cfg
    spec = art.spec if expert_format is None else dataclasses.replace(art.spec, expert_format=expert_format)
    if art.perm.shape[0] != c.num_layers or art.spec.hidden_size != c.hidden_size:
        raise AdapterError(f"the MoEfication is for {art.perm.shape[0]} layers of width {art.spec.hidden_size}, "
                           f"not this {c.num_layers}-layer, {c.hidden_size}-wide model")
    bank: dict[tuple[int, int], torch.Tensor] = {}
    inter = c.intermediate_size
    dtype = model.embed_tokens.weight.dtype
    for i, blk in enumerate(model.layers):
        gu = blk.gate_up.dense()
        gate, up, down = gu[:inter], gu[inter:], blk.down.dense()
        if art.lora:  # the recovery fine-tune's low-rank deltas (m2r2.moe.recover)
            gate, up, down = fold(gate, up, down, art.lora, i)
        for e, idx in enumerate(art.perm[i]):
            buf = pack_expert(gate[idx], up[idx], down[:, idx]).to(dtype)
            bank[(i, e)] = buf if spec.expert_format == "f32" else quantize_expert(buf, spec)
        ffn = MoEFFN(i, spec)
        with torch.no_grad():
            ffn.router.weight.copy_(art.router_w[i])
            ffn.router.bias.copy_(art.router_b[i])
        model.layers[i] = MoEBlock(blk, ffn.to(dtype).requires_grad_(False))
    return MoEModel(model, spec, bank, {"kind": "moefy", **art.info})


def load_moefied(lm, path: str | os.PathLike | None = None, num_experts: int = 16, top_k: int | None = None,
                 expert_format: str | None = None) -> MoEModel:
    """The embedded (or any) model MoEfied with shipped (or ``path``) artifacts; converts ``lm`` in place, so
    ``lm.generate`` then runs the MoE (all experts resident). Shipped for the embedded model: 16 experts, top-4,
    recovered (the default), and the earlier 8-expert MoEfication (top-6, not recovered: ``num_experts=8``)."""
    if path is None:
        path = find_shipped(lm.source.identity, num_experts)
        if path is None:
            raise AdapterError(f"no MoEfication with {num_experts} experts ships for {lm.source.name}; make one with "
                               "`m2r2 moefy` and pass its directory")
    art = MoEfyArtifacts.load(path, lm.source.identity)
    moe = apply(lm.model, art, expert_format)
    if top_k is not None:
        moe.set_top_k(top_k)
    return moe


def moefy(lm, data_dir: str | os.PathLike, cfg: MoEfyConfig) -> MoEfyArtifacts:
    """Statistics, clustering and routers for every layer of ``lm.model`` (dense)."""
    t0 = time.perf_counter()
    model = lm.model
    c = model.cfg
    if c.intermediate_size % cfg.num_experts:
        raise AdapterError(f"{cfg.num_experts} experts do not divide the FFN's {c.intermediate_size} neurons")
    recs = load_records(data_dir)
    train, held = split_records(recs, cfg.heldout_every)
    train = train[: cfg.sequences]
    held = held[: max(8, cfg.sequences // 6)]
    H, A = collect(model, train, cfg)
    Hh, Ah = collect(model, held, cfg, desc="held-out")
    perms, ws, bs, recalls, captured = [], [], [], [], []
    for i in tqdm(range(c.num_layers), desc="cluster + routers", unit="layer"):
        perm = cluster_layer(A[i], cfg.num_experts, cfg.kmeans_iters, cfg.seed + i)
        down = model.layers[i].down.dense().float()
        Y = expert_importance(A[i], down, perm)
        w, b = fit_router(H[i].float(), Y, cfg.ridge)
        Yh = expert_importance(Ah[i], down, perm)
        pred = Hh[i].float() @ w.t() + b
        recalls.append(round(topk_recall(pred, Yh, cfg.top_k), 4))
        # fraction of the FFN output norm the routed top-k experts carry (held out)
        full = Ah[i].float() @ down.t()
        top = pred.topk(cfg.top_k, -1).indices
        mask = torch.zeros_like(Ah[i], dtype=torch.float32)
        for j, idx in enumerate(perm):
            mask[:, idx] = (top == j).any(-1, keepdim=True).float()
        part = (Ah[i].float() * mask) @ down.t()
        captured.append(round(float(1 - (full - part).norm(dim=-1).mean() / full.norm(dim=-1).mean()), 4))
        perms.append(perm)
        ws.append(w)
        bs.append(b)
    spec = MoESpec(cfg.num_experts, cfg.top_k, c.intermediate_size // cfg.num_experts, c.hidden_size,
                   routing="moefy", router_bias=True)
    info = {"config": cfg.__dict__, "data": str(data_dir), "train_records": len(train), "heldout_records": len(held),
            "tokens": int(H[0].shape[0]), "seconds": round(time.perf_counter() - t0, 1),
            "router_topk_recall_heldout": recalls, "output_fraction_heldout": captured}
    return MoEfyArtifacts(spec, torch.stack(perms), torch.stack(ws), torch.stack(bs), lm.source.identity, info)


# ---------------------------------------------------------------- quality

@torch.inference_mode()
def perplexity(model, records: list[dict], max_len: int) -> float:
    """Perplexity of the records' responses (teacher forcing, prompt as context)."""
    nll, n = 0.0, 0
    for r in records:
        ids = _ids(r, max_len)
        T = len(ids)
        p = min(len(r["prompt_ids"]), T - 1)
        cache = model.new_cache(1, T)
        logits = model(ids.view(1, -1), cache, torch.arange(T).view(1, -1))[0]
        lp = torch.log_softmax(logits[p - 1:T - 1].float(), -1)
        nll -= float(lp.gather(1, ids[p:T].view(-1, 1)).sum())
        n += T - p
    return float(torch.exp(torch.tensor(nll / max(n, 1))))


def rouge_l(refs: list[str], outs: list[str]) -> float:
    from rouge_score import rouge_scorer
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(sc.score(a, b)["rougeL"].fmeasure for a, b in zip(refs, outs)) / max(1, len(refs))


def heldout_records(data_dir: str | os.PathLike, n: int = 24, heldout_every: int = 6,
                    exclude: set | None = None) -> list[dict]:
    """The perplexity records: the end of the held-out split (not the records the routers were checked on),
    without any whose prompt is in ``exclude`` (what a recovery fine-tune trained on: ``seen_in_recovery``)."""
    _, held = split_records(load_records(data_dir), heldout_every)
    if exclude:
        held = [r for r in held if tuple(r["prompt_ids"]) not in exclude]
    return held[-n:]


def seen_in_recovery(art: "MoEfyArtifacts") -> set:
    """The prompts (token tuples) of every record the artifact's recovery fine-tune trained on, recomputed from its
    recorded data, batch size, seed and steps (its batches are a pure function of them)."""
    rec = art.info.get("recovery")
    if not rec:
        return set()
    from ..training.adapters import batch_indices
    cfg = rec["config"]
    recs = load_records(cfg["data"])
    idx = {i for s in range(rec["steps"]) for i in batch_indices(len(recs), s, cfg["batch_size"], cfg["seed"])}
    return {tuple(recs[i]["prompt_ids"]) for i in idx}


def evaluate(lm, moe: MoEModel, data_dir: str | os.PathLike, top_ks: list[int], prompts: str = "mt-bench",
             n_prompts: int = 16, max_new_tokens: int = 64, ppl_records: int = 24, max_len: int = 256,
             heldout_every: int = 6, dense_ref: dict | None = None, exclude: set | None = None) -> dict:
    """Perplexity (held-out distillation records, none in ``exclude``) and Rouge-L / exact-match of greedy outputs
    against the dense model on ``n_prompts`` MT-Bench prompts, for each top-k. ``dense_ref`` ({"ppl", "outputs"})
    is the dense model's on the same records, measured before the conversion (``dense_reference``)."""
    from ..prompts import load_prompts
    held = heldout_records(data_dir, ppl_records, heldout_every, exclude)
    recs = load_prompts(prompts, limit=n_prompts)
    ids = [lm.encode(r.text) for r in recs]
    out = {"dense": {"ppl": dense_ref["ppl"]}, "by_top_k": {}, "n_prompts": len(ids),
           "max_new_tokens": max_new_tokens, "ppl_records": len(held), "prompts": prompts}
    refs = [lm.decode_text(o) for o in dense_ref["outputs"]]
    k0 = moe.top_k
    for k in tqdm(top_ks, desc="quality", unit="k"):
        moe.set_top_k(k)
        ppl = perplexity(lm.model, held, max_len)
        outs = [lm.generate(p, max_new_tokens=max_new_tokens).token_ids for p in ids]
        same = sum(o == d for o, d in zip(outs, dense_ref["outputs"]))
        out["by_top_k"][k] = {"ppl": round(ppl, 3), "ppl_ratio": round(ppl / dense_ref["ppl"], 3),
                              "rouge_l": round(rouge_l(refs, [lm.decode_text(o) for o in outs]), 4),
                              "identical_outputs": same, "active_fraction": k / moe.spec.num_experts}
    moe.set_top_k(k0)
    return out


def dense_reference(lm, data_dir, prompts: str = "mt-bench", n_prompts: int = 16, max_new_tokens: int = 64,
                    ppl_records: int = 24, max_len: int = 256, heldout_every: int = 6, exclude: set | None = None) -> dict:
    from ..prompts import load_prompts
    held = heldout_records(data_dir, ppl_records, heldout_every, exclude)
    recs = load_prompts(prompts, limit=n_prompts)
    outs = [lm.generate(lm.encode(r.text), max_new_tokens=max_new_tokens).token_ids for r in recs]
    return {"ppl": round(perplexity(lm.model, held, max_len), 3), "outputs": outs}
