"""Self-speculative decoding with M2R2 drafts on tiny random models: lossless by equality (greedy) and by
distribution (sampling)."""

from __future__ import annotations

import pytest
import torch

import m2r2
from m2r2.stream.accelerator import Accelerator
from m2r2.decoding.loop import decode
from m2r2.engine.sampling import SamplingConfig
from m2r2.decoding.speculative import SelfSpeculative

from conftest import assert_close_rel, make_tiny, next_token_probs

PROMPTS = [[5, 17, 33, 99, 4], [7, 8], [200, 13, 13, 13, 54, 66, 71, 2, 9, 120, 33], [42]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-spec")
    make_tiny(d, "llama", num_hidden_layers=6, eos_token_id=None)
    return m2r2.load(d)


def _acc(lm, scale: float, rate: int = 2, seed: int = 0) -> Accelerator:
    acc = Accelerator.for_model(lm.model, lm.source.identity, rate=rate, rank=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in acc.adapters:
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * scale)
    return acc.eval()


@pytest.mark.parametrize("scale,rate,gamma,stop", [(0.0, 2, 4, 0.0), (0.3, 2, 3, 0.0), (0.1, 3, 6, 0.3),
                                                   (0.0, 4, 1, 0.0)])
def test_greedy_speculative_equals_plain(lm, scale, rate, gamma, stop):
    acc = _acc(lm, scale, rate)
    for p in PROMPTS:
        plain, _ = decode(lm.model, [p], max_new_tokens=128)
        spec, st = decode(lm.model, [p], max_new_tokens=128,
                          strategy=SelfSpeculative(acc, gamma=gamma, max_gamma=8, stop_below=stop))
        assert spec == plain
        assert st.extra["verify_steps"] == st.steps and st.extra["drafted"] > 0


def test_greedy_speculative_batch_ragged(lm):
    """Rows accept different numbers of drafts per step; each row still equals its own plain output."""
    acc = _acc(lm, 0.05)
    plain = [decode(lm.model, [p], max_new_tokens=128)[0][0] for p in PROMPTS]
    spec, st = decode(lm.model, PROMPTS, max_new_tokens=128, strategy=SelfSpeculative(acc, gamma=4))
    assert spec == plain
    assert 0 < st.extra["acceptance"] < 1  # ragged acceptance really happened
    # per depth: every kept draft counted once at its depth; depth 1 checked on every live row of a step with drafts;
    # a deeper draft checked only where every draft before it was kept
    x = st.extra
    reached, kept = x["depth_reached"], x["depth_kept"]
    assert sum(kept) == x["accepted"] and reached[0] >= x["verify_steps"] and reached[0] <= len(PROMPTS) * x["verify_steps"]
    assert all(reached[d + 1] <= kept[d] for d in range(len(reached) - 1))
    assert x["acceptance_by_depth"][0] == kept[0] / reached[0]
    assert sum(n for n, _ in x["verify_by_rows"].values()) == x["verify_steps"]


def test_speculative_stops_at_eos_and_budget(lm):
    acc = _acc(lm, 0.0)
    plain, _ = decode(lm.model, [PROMPTS[0]], max_new_tokens=40)
    eos = plain[0][17]
    spec, _ = decode(lm.model, [PROMPTS[0], PROMPTS[1]], max_new_tokens=40, eos_token_ids=(eos,),
                     strategy=SelfSpeculative(acc, gamma=5))
    assert spec[0] == plain[0][:plain[0].index(eos) + 1]
    plain1, _ = decode(lm.model, [PROMPTS[1]], max_new_tokens=40, eos_token_ids=(eos,))
    assert spec[1] == plain1[0] and 0 < len(spec[1]) <= 40  # the other row: its own stop, the same tokens


def test_identity_adapter_drafts_are_early_exit_read_outs(lm):
    """An untrained fast stream drafts the layer-F read-out of the slow stream (its acceptance is what
    early exit without adapters gets); a perfect drafter (R=1: the whole model) is always accepted."""
    full = Accelerator.for_model(lm.model, lm.source.identity, rate=1, rank=4)
    out, st = decode(lm.model, [PROMPTS[0]], max_new_tokens=64, strategy=SelfSpeculative(full, gamma=4))
    assert st.extra["acceptance"] == 1.0
    assert st.extra["verify_steps"] < 64 / 3


def test_lm_generate_m2r2_needs_an_adapter(lm):
    with pytest.raises(m2r2.AdapterError):
        lm.generate([5, 6], max_new_tokens=4, strategy="m2r2")


def test_rejection_sampling_keeps_the_model_distribution(lm):
    """Under sampling, the joint law of the first two decode-step tokens equals the model's own (computed
    exactly from its logits), whatever the drafter: total variation within sampling noise (fixed seeds)."""
    s = SamplingConfig(temperature=0.8, top_k=4)
    prompt = PROMPTS[0]
    model = lm.model
    # condition on the first sampled token (from prefill, identical in both paths): take the likeliest
    t0 = int(next_token_probs(model, prompt, s).argmax())
    p1 = next_token_probs(model, prompt + [t0], s)
    exact = {}
    for a in p1.nonzero()[:, 0].tolist():
        p2 = next_token_probs(model, prompt + [t0, a], s)
        for b in p2.nonzero()[:, 0].tolist():
            exact[(a, b)] = float(p1[a] * p2[b])
    acc = _acc(lm, 0.3)  # a poor drafter: many rejections, residual sampling exercised
    counts: dict = {}
    n = 0
    for seed in range(3000):
        out, st = decode(model, [prompt], max_new_tokens=3, sampling=SamplingConfig(0.8, 4, 1.0, seed),
                         strategy=SelfSpeculative(acc, gamma=2, adaptive=False))
        if out[0][0] != t0:
            continue
        key = (out[0][1], out[0][2])
        counts[key] = counts.get(key, 0) + 1
        n += 1
    assert n > 300
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - v) for k, v in exact.items())
    assert set(counts) <= set(exact)
    assert tv < 0.08, tv


# ---- the verifier on hand-written logits ----

from m2r2.decoding.speculative import (Draft, DraftHead, PromptLookupDrafter, Speculative, StreamDrafter,  # noqa: E402
                              verify)

P = torch.tensor([0.5, 0.3, 0.2, 0.0])
S = SamplingConfig(temperature=1.0, seed=0)


def _logits(p: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
    return p.clamp_min(1e-30).log().expand(rows, positions, -1).clone()


def _first_tokens(drafts: torch.Tensor, q: torch.Tensor | None, n: int, seed: int):
    """Verify n rows that all draft the same thing against P; return (accepted, first emitted token)."""
    g = torch.Generator().manual_seed(seed)
    acc, nxt = verify(_logits(P, n, drafts.shape[1] + 1), Draft(drafts.expand(n, -1), None if q is None else
                                                                 q.expand(n, *q.shape[1:])), S, g)
    first = torch.where(acc > 0, drafts[0, 0].expand(n), nxt)
    return acc, first


def _freq(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=4).double() / len(tokens)


def test_verify_always_accepts_when_the_drafter_is_the_model():
    q = P.view(1, 1, 4).expand(1, 3, 4)
    drafts = torch.tensor([[0, 1, 2]])
    acc, _ = _first_tokens(drafts, q, 2000, seed=1)
    assert bool((acc == 3).all())


def test_verify_never_accepts_an_impossible_draft_and_samples_the_model():
    q = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4)  # all mass where the model has none
    acc, first = _first_tokens(torch.tensor([[3]]), q, 20000, seed=2)
    assert bool((acc == 0).all())
    assert (_freq(first) - P.double()).abs().max() < 0.015


@pytest.mark.parametrize("q", [torch.tensor([0.2, 0.6, 0.2, 0.0]), torch.tensor([0.1, 0.1, 0.1, 0.7])])
def test_verify_sometimes_accepts_and_the_residual_restores_the_model(q):
    """Draft sampled from q, accepted with min(1, p/q), residual max(0, p-q): the emitted token is
    distributed as p (checked per draft token and overall), and acceptance is sum(min(p, q))."""
    n = 40000
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).view(n, 1)
    acc, nxt = verify(_logits(P, n, 2), Draft(drafts, q.view(1, 1, 4).expand(n, 1, 4)), S, g)
    first = torch.where(acc > 0, drafts[:, 0], nxt)
    assert (_freq(first) - P.double()).abs().max() < 0.01
    assert abs(float(acc.double().mean()) - float(torch.minimum(P, q).sum())) < 0.01
    rejected = acc == 0
    resid = (P - q).clamp_min(0)
    assert (_freq(nxt[rejected]) - (resid / resid.sum()).double()).abs().max() < 0.015


def test_verify_point_mass_drafts_accept_with_the_model_probability():
    acc, first = _first_tokens(torch.tensor([[1]]), None, 40000, seed=4)
    assert abs(float(acc.double().mean()) - 0.3) < 0.01
    assert (_freq(first) - P.double()).abs().max() < 0.01


def test_verify_greedy_is_the_matching_prefix_plus_the_model_token():
    logits = torch.full((3, 4, 6), -5.0)
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    logits.scatter_(2, target.unsqueeze(-1), 5.0)
    drafts = torch.tensor([[1, 2, 3], [1, 5, 3], [0, 2, 3]])
    acc, nxt = verify(logits, Draft(drafts), SamplingConfig())
    assert acc.tolist() == [3, 1, 0] and nxt.tolist() == [4, 2, 1]


# ---- the peers' drafters: lossless on the same loop ----

REPETITIVE = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [11, 12, 13, 11, 12], [3, 4]]


def test_prompt_lookup_finds_the_latest_ngram():
    d = PromptLookupDrafter(max_ngram=2)
    assert d.lookup([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 3) == [4, 8, 1]
    assert d.lookup([1, 2, 3, 7, 3], 2) == [7, 3]  # falls back to a 1-gram
    assert d.lookup([1, 2, 3], 2) == []


@pytest.mark.parametrize("make", [
    lambda acc: PromptLookupDrafter(),
    lambda acc: StreamDrafter(None, depth=2),
    lambda acc: StreamDrafter(acc, vocab=torch.arange(0, 256, 2)),  # reduced draft vocabulary
])
def test_peer_drafters_greedy_equal_plain(lm, make):
    acc = _acc(lm, 0.05)
    prompts = REPETITIVE + PROMPTS
    plain = [decode(lm.model, [p], max_new_tokens=96)[0][0] for p in prompts]
    spec, st = decode(lm.model, prompts, max_new_tokens=96, strategy=Speculative(make(acc), gamma=3))
    assert spec == plain
    assert st.extra["drafted"] > 0 and st.extra["verify_steps"] == st.steps


def test_draft_head_over_a_subset_equals_the_full_head_restricted(lm):
    vocab = torch.tensor([3, 17, 40, 41, 200])
    h = torch.randn(2, lm.config.hidden_size)
    full = lm.model.head(h)[:, vocab]
    assert_close_rel(DraftHead(lm.model, vocab).logits(h), full)


# ---- draft trees: one forward over a tree mask, cache compaction, identity, the sampled joint law ----

from m2r2.decoding.speculative import verify_tree  # noqa: E402
from m2r2.engine import native  # noqa: E402
from m2r2.engine.cache import TreeMask  # noqa: E402

TREE = [-1, 0, 1, -1, 0, 3, -1, 4]  # draft i's parent (-1: the pending token): depth 3, 8 nodes, leaves off the chain


def _path(parents: list[int], i: int) -> list[int]:
    """Draft i's path from the pending token: the draft indices on it, root side first."""
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def _prefilled(lm, prompt: list[int], room: int = 32):
    c = lm.model.new_cache(1, len(prompt) + room)
    lm.model(torch.tensor([prompt]), c, torch.arange(len(prompt)).view(1, -1))
    c.advance(len(prompt))
    return c


@pytest.mark.parametrize("kernels", ["native", "pytorch"])
def test_tree_mask_equals_sequential_decoding_of_each_branch(lm, kernels):
    """Every node's logits from one tree forward equal those of decoding its own path as a plain sequence (by the
    relative bound: a different number of rows may sum in another order), and its K/V land in its slot."""
    if kernels == "native" and not native.available():
        pytest.skip("no native kernels here")
    prompt, pending = PROMPTS[2], 77
    g = torch.Generator().manual_seed(5)
    drafts = torch.randint(0, lm.model.cfg.vocab_size, (1, len(TREE)), generator=g)
    with torch.no_grad(), (native.disabled() if kernels == "pytorch" else torch.enable_grad()):
        c = _prefilled(lm, prompt)
        n = c.lengths.clone()
        tree = TreeMask(TREE, n)
        logits = lm.model(torch.cat([torch.tensor([[pending]]), drafts], 1), c, tree.slots, tree=tree)[0]
        for node in range(len(TREE) + 1):
            path = _path(TREE, node - 1)
            seq = torch.tensor([[pending] + drafts[0, path].tolist()])
            c2 = _prefilled(lm, prompt)
            ref = lm.model(seq, c2, n.view(1, 1) + torch.arange(seq.shape[1]))[0, -1]
            assert_close_rel(logits[node], ref)
            slot = int(n) + node  # the node's own K/V: what the sequence wrote at its last position
            for layer in (0, len(c.k) - 1):
                assert_close_rel(c.k[layer][0, :, slot], c2.k[layer][0, :, int(n) + len(path)])


def test_tree_compaction_leaves_the_accepted_path_in_consecutive_slots(lm):
    """Greedy verification of a tree whose accepted path ends in a leaf (the main chain is wrong at depth 2, a leaf
    there is right): the path is found, and after compaction the cache's slots n .. n+2 hold the K/V a plain forward
    of the committed tokens writes there."""
    from m2r2.decoding.drafters.base import Drafter
    prompt = PROMPTS[0]
    out, _ = decode(lm.model, [prompt], max_new_tokens=4)
    pending, plain = out[0][0], out[0][1:]  # the model's own continuation after the pending token
    V = lm.model.cfg.vocab_size
    drafts = torch.tensor([[plain[0], (plain[1] + 1) % V, 3, plain[1]]])
    parents = [-1, 0, 1, 0]  # chain 0 -> 1 -> 2, and draft 3 a leaf under draft 0
    with torch.no_grad():
        c = _prefilled(lm, prompt)
        n = c.lengths.clone()
        tree = TreeMask(parents, n)
        logits = lm.model(torch.cat([torch.tensor([[pending]]), drafts], 1), c, tree.slots, tree=tree)
        acc, nxt, paths = verify_tree(logits, Draft(drafts, None, parents), SamplingConfig())
        assert paths == [[0, 3]] and int(acc[0]) == 2 and int(nxt[0]) == plain[2]
        state = type("State", (), {"cache": c})()
        spec = Speculative(Drafter())
        spec._compact(state, paths, n, None)
        ref = _prefilled(lm, prompt)
        lm.model(torch.tensor([[pending, plain[0], plain[1]]]), ref, n.view(1, 1) + torch.arange(3))
        k = int(n)
        for layer in range(len(c.k)):
            assert_close_rel(c.k[layer][0, :, k:k + 3], ref.k[layer][0, :, k:k + 3])
            assert_close_rel(c.v[layer][0, :, k:k + 3], ref.v[layer][0, :, k:k + 3])


@pytest.mark.parametrize("branch,gamma,min_prob", [(2, 3, 0.0), (4, 2, 0.0), (4, 3, 0.02)])
def test_greedy_tree_speculation_equals_plain(lm, branch, gamma, min_prob):
    acc = _acc(lm, 0.3)

    def drafter():
        d = StreamDrafter(acc)
        d.branch, d.leaf_min_prob = branch, min_prob
        return d
    nodes = drafted = 0
    for p in PROMPTS:
        plain, _ = decode(lm.model, [p], max_new_tokens=96)
        spec, st = decode(lm.model, [p], max_new_tokens=96, strategy=Speculative(drafter(), gamma=gamma))
        assert spec == plain
        assert st.extra["tree_steps"] > 0
        nodes, drafted = nodes + st.extra["draft_nodes"], drafted + st.extra["drafted"]
    if min_prob == 0:  # every leaf: (branch - 1) per depth
        assert nodes == branch * drafted
    else:  # confidence-gated: some leaves, not all
        assert drafted < nodes < branch * drafted
    # a ragged batch of trees
    spec, st = decode(lm.model, PROMPTS, max_new_tokens=96, strategy=Speculative(drafter(), gamma=gamma))
    assert spec == [decode(lm.model, [p], max_new_tokens=96)[0][0] for p in PROMPTS]


def test_leaves_are_kept_by_mask_after_the_chain():
    chain = torch.tensor([[1, 2, 3]])
    leaves = torch.tensor([[[11, 12], [21, 22], [31, 32]]])
    keep = torch.tensor([[True, False], [False, False], [True, True]])
    d = Draft.with_leaves(chain, None, leaves, keep)
    assert d.tokens.tolist() == [[1, 2, 3, 11, 31, 32]] and d.parents == [-1, 0, 1, -1, 1, 1] and d.depth == 3
    assert d.chain(2).tokens.tolist() == [[1, 2]] and d.chain(2).parents is None
    assert Draft.with_leaves(chain, None, leaves, torch.zeros(3, 2, dtype=torch.bool)).parents is None


def test_tree_verification_keeps_the_model_joint_law():
    """A depth-2 tree of independent samples (3 candidates for the first token, 2 under each of the first two) from
    proposal tables q, verified against a model's conditional tables p: the first two tokens emitted follow
    p(x1) p(x2 | x1) (chi-square-sized bound over 30,000 trials); leaves are accepted on the way."""
    V = 4
    g = torch.Generator().manual_seed(11)
    p1 = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # p(x2 | x1)
    q1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q2 = torch.softmax(torch.randn(V, V, generator=g), -1)
    parents = [-1, 0, -1, -1, 2, 0, 2]  # depth-1 nodes 0, 2, 3; depth-2: 1, 5 under 0 and 4, 6 under 2
    n = 30000
    d1 = torch.multinomial(q1, 3 * n, replacement=True, generator=g).view(n, 3)  # nodes 0, 2, 3
    tokens = torch.zeros(n, len(parents), dtype=torch.long)
    tokens[:, 0], tokens[:, 2], tokens[:, 3] = d1[:, 0], d1[:, 1], d1[:, 2]
    for a, kids in ((0, (1, 5)), (2, (4, 6))):
        for k in kids:
            tokens[:, k] = torch.multinomial(q2[tokens[:, a]], 1, generator=g)[:, 0]
    q = torch.zeros(n, len(parents), V)
    for i, par in enumerate(parents):
        q[:, i] = q1 if par < 0 else q2[tokens[:, par]]
    logits = torch.zeros(n, len(parents) + 1, V)
    logits[:, 0] = p1.log()
    for i in range(len(parents)):  # the model's next-token law after node i's path
        path = _path(parents, i)
        logits[:, i + 1] = p2[tokens[:, i]].log() if len(path) == 1 else p1.log()  # (depth-2 rows: unused below)
    acc, nxt, paths = verify_tree(logits, Draft(tokens, q, parents), S, torch.Generator().manual_seed(12))
    out = []
    for b in range(n):
        seq = tokens[b, paths[b]].tolist() + [int(nxt[b])]
        if len(seq) == 1:  # the next step's own sample from the model
            seq.append(int(torch.multinomial(p2[seq[0]], 1, generator=g)))
        out.append(seq[0] * V + seq[1])
    freq = torch.bincount(torch.tensor(out), minlength=V * V).double() / n
    want = (p1.view(-1, 1) * p2).reshape(-1).double()
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max() + 1e-3
    assert any(pth and pth[0] in (2, 3) for pth in paths)  # candidates after the first were accepted too
    assert any(len(pth) == 2 for pth in paths)


def test_tree_options_and_limits(lm):
    with pytest.raises(ValueError, match="at most"):
        TreeMask(list(range(-1, 70)), torch.tensor([0]))
    with pytest.raises(ValueError, match="come before"):
        TreeMask([-1, 2, 0], torch.tensor([0]))
    with pytest.raises(m2r2.StrategyError, match="chains only"):
        lm.strategy("prompt-lookup", branch=2)
