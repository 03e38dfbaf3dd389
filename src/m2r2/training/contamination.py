"""Evaluation hygiene: an index of every built-in evaluation prompt (MT-Bench, Spec-Bench, Koala; all turns)
that recognises a text resembling one (same normalised text, same opening, or character-5-gram Jaccard),
so that no training prompt is a test input.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Iterable, Sequence

EVAL_SETS = ("mt-bench", "spec-bench", "koala")
PREFIX_CHARS = 60  # same normalised opening of this length = near-duplicate
NGRAM = 5
JACCARD = 0.5  # character-5-gram Jaccard above this = near-duplicate


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _grams(s: str) -> set[str]:
    return {s[i:i + NGRAM] for i in range(len(s) - NGRAM + 1)} if len(s) >= NGRAM else {s}


class EvalIndex:
    """Matches text against evaluation prompts: exact (normalised), same first ``PREFIX_CHARS``
    normalised characters, or character-5-gram Jaccard > ``JACCARD``.

    The Jaccard test uses prefix filtering so it stays cheap: order grams rarest-first (by how many eval
    prompts hold them); two sets with Jaccard >= t must share a gram among the first |A| - ceil(t|A|) + 1
    of each, so only eval prompts indexed under those few grams need an exact comparison."""

    def __init__(self, texts: Iterable[str]):
        norms = list(dict.fromkeys(n for n in (normalize(t) for t in texts) if n))
        self.exact = set(norms)
        self.prefixes = {n[:PREFIX_CHARS] for n in norms if len(n) >= PREFIX_CHARS}
        self.sets = [_grams(n) for n in norms]
        df = Counter(g for s in self.sets for g in s)
        # the global order as integer ranks: grams no eval prompt holds come first (rank -1)
        self.rank = {g: r for r, g in enumerate(sorted(df, key=lambda g: (df[g], g)))}
        self.index: dict[str, list[int]] = {}
        for i, s in enumerate(self.sets):
            for g in sorted(s, key=self.rank.__getitem__)[: self._prefix_len(len(s))]:
                self.index.setdefault(g, []).append(i)

    @staticmethod
    def _prefix_len(n: int) -> int:
        return n - math.ceil(JACCARD * n) + 1

    def match(self, text: str) -> str | None:
        """Why ``text`` counts as an evaluation prompt ("exact", "prefix", "jaccard"), or None."""
        n = normalize(text)
        if n in self.exact:
            return "exact"
        if len(n) >= PREFIX_CHARS and n[:PREFIX_CHARS] in self.prefixes:
            return "prefix"
        a = _grams(n)
        p = self._prefix_len(len(a))
        seen = [g for g in a if g in self.rank]
        unseen = len(a) - len(seen)
        if unseen >= p:  # the whole prefix is grams no eval prompt has: nothing can reach the threshold
            return None
        cands = {i for g in sorted(seen, key=self.rank.__getitem__)[: p - unseen] for i in self.index.get(g, ())}
        for i in cands:
            b = self.sets[i]
            if min(len(a), len(b)) <= JACCARD * max(len(a), len(b)):
                continue  # sizes alone rule out Jaccard > t
            inter = len(a & b)
            if inter > JACCARD * (len(a) + len(b) - inter):
                return "jaccard"
        return None


def eval_prompt_texts(sets: Sequence[str] = EVAL_SETS) -> list[str]:
    """Every turn of every built-in evaluation prompt (second turns too: they are test inputs)."""
    from ..prompts import builtin_path, load_prompts
    texts = [r.text for name in sets for r in load_prompts(name)]
    for name in sets:  # load_prompts keeps first turns only; add the rest
        with open(builtin_path(name), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    turns = json.loads(line).get("turns")
                    if isinstance(turns, list):
                        texts += [t for t in turns[1:] if isinstance(t, str)]
    return texts


def exclude_eval(items: Sequence[tuple[str, str]], index: EvalIndex) -> tuple[list[tuple[str, str]], Counter]:
    kept, why = [], Counter()
    for pid, text in items:
        reason = index.match(text)
        if reason is None:
            kept.append((pid, text))
        else:
            why[reason] += 1
    return kept, why
