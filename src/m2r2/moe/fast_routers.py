"""Routers fitted to the M2R2 fast stream (``fit_fast_routers``), read by ``prefetch.M2R2Prefetch(routers=...)``.

The fast state after fast layer i approximates the slow state R layers deeper, with a systematic error the target
layer's own norm and router know nothing about. Recording, on calibration prompts (self-distillation data, never an
evaluation set), the fast state that predicts layer j next to layer j's true router logits, and fitting a linear map
between them by ridge regression (closed form; the ridge strength chosen on held-out calibration prompts), absorbs
that error. Predictions only decide what is loaded when, never what is computed.
"""

from __future__ import annotations

import torch

from .layers import MoEModel
from .prefetch import M2R2Prefetch, MoEDecode


class FastRouters:
    """Routers calibrated for the fast stream: for each layer j, a linear map from the fast state that predicts j
    (RMS-normalised) to layer j's router logits. The fast state approximates the slow state R layers deeper, with a
    systematic error the target layer's own router does not know about; a least-squares fit on calibration tokens
    (``fit_fast_routers``: prompts of the self-distillation data, never the evaluation sets) absorbs it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias = weight, bias  # (L, D, E), (L, E); layers never predicted stay zero
        self._cache: dict = {}

    def stacked(self, targets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._cache.get(targets)
        if got is None:
            got = self._cache[targets] = (torch.cat([self.weight[j] for j in targets], 1).contiguous(),
                                          torch.cat([self.bias[j] for j in targets]))
        return got


class _Recorder(M2R2Prefetch):
    """M2R2Prefetch that also records, per decode token, the fast states and each layer's router logits (computed
    from the slow state it is handed, through the layer's own norm and router)."""

    def __init__(self, moe: MoEModel, top_k: int):
        super().__init__(moe, top_k)
        self.fast: list[tuple[int, int, torch.Tensor]] = []  # (token, fast layer, state)
        self.logits: dict[tuple[int, int], torch.Tensor] = {}  # (token, layer) -> router logits

    def on_fetch(self, cache, layer, experts, state) -> None:
        if cache.recording and state is not None:
            blk = self.moe.model.layers[layer]
            with torch.no_grad():
                self.logits[(cache.token, layer)] = blk.ffn.router(blk.post_norm(state.reshape(1, -1))).float()[0]
        super().on_fetch(cache, layer, experts, state)

    def after_fast(self, cache, layer, targets, f) -> None:
        if cache.recording:
            self.fast.append((cache.token, layer, f.reshape(-1).float().clone()))
        super().after_fast(cache, layer, targets, f)


def fit_fast_routers(lm, moe: MoEModel, acc, prompts: list[list[int]], max_new_tokens: int = 48,
                     ridges: tuple[float, ...] = (10.0, 100.0, 1000.0, 1e4, 1e5), heldout: float = 0.25,
                     progress: bool = True) -> tuple[FastRouters, dict]:
    """Decode ``prompts`` (calibration token ids) with the fast row riding, record (fast state, target layer's
    router logits) pairs, and fit each target layer's ``FastRouters`` map by ridge regression (closed form, float64).
    The ridge strength is chosen on the last ``heldout`` fraction of the prompts (top-k precision there), then the
    maps are refitted on all of them. Returns the routers and the held-out precision of the layers' own routers and
    of the fitted ones."""
    from tqdm.auto import tqdm

    from .memory import ExpertCache
    from .stores import LinkStore
    L, R = moe.num_layers, acc.cfg.rate
    k = moe.top_k
    X: dict[int, list] = {}
    Y: dict[int, list] = {}
    P: dict[int, list] = {}  # the prompt each sample came from
    eps = moe.model.layers[0].post_norm.eps
    for n, ids in enumerate(tqdm(prompts, desc="calibrate fast routers", unit="prompt", disable=not progress)):
        rec = _Recorder(moe, k)
        cache = ExpertCache(moe, moe.total_experts, LinkStore(moe.bank, 1000.0))
        cache.policy = rec
        try:
            lm.generate(list(ids), max_new_tokens=max_new_tokens, strategy=MoEDecode(moe, cache, acc, rec))
        finally:
            cache.close()
        for token, i, f in rec.fast:
            x = f * torch.rsqrt(f.pow(2).mean() + eps)
            for j in range(R * i + 1, R * (i + 1) + 1):
                if i < j < L and (token, j) in rec.logits:
                    X.setdefault(j, []).append(x)
                    Y.setdefault(j, []).append(rec.logits[(token, j)])
                    P.setdefault(j, []).append(n)
    D, E = moe.spec.hidden_size, moe.spec.num_experts
    cut = int(len(prompts) * (1 - heldout))

    def solve(x, y, lam):
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        reg = lam * torch.eye(D + 1, dtype=x.dtype)
        reg[-1, -1] = 0.0
        return torch.linalg.solve(xa.t() @ xa + reg, xa.t() @ y)

    def hits(pred, y):
        true = y.topk(k, -1).indices
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(pred.topk(k, -1).indices, true))

    data = {j: (torch.stack(X[j]).double(), torch.stack(Y[j]).double(), torch.tensor(P[j])) for j in X}
    score = {lam: 0 for lam in ridges}
    own = total = 0
    for j, (x, y, pr) in data.items():
        tr, te = pr < cut, pr >= cut
        if not te.any() or not tr.any():
            continue
        for lam in ridges:
            w = solve(x[tr], y[tr], lam)
            score[lam] += hits(torch.cat([x[te], torch.ones(int(te.sum()), 1, dtype=x.dtype)], 1) @ w, y[te])
        blk = moe.model.layers[j]
        b = blk.ffn.router.bias.double() if blk.ffn.router.bias is not None else 0
        own += hits((x[te] * blk.post_norm.weight.double()) @ blk.ffn.router.weight.double().t() + b, y[te])
        total += k * int(te.sum())
    lam = max(ridges, key=lambda r: score[r])
    weight, bias = torch.zeros(L, D, E), torch.zeros(L, E)
    for j, (x, y, _) in data.items():
        w = solve(x, y, lam)
        weight[j], bias[j] = w[:-1].float(), w[-1].float()
    info = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "ridge": lam,
            "samples_per_layer": min(len(v) for v in X.values()) if X else 0, "heldout_prompts": len(prompts) - cut,
            "heldout_precision_own_routers": own / total if total else None,
            "heldout_precision_fitted": score[lam] / total if total else None,
            "heldout_precision_by_ridge": {str(r): score[r] / total if total else None for r in ridges}}
    return FastRouters(weight, bias), info
