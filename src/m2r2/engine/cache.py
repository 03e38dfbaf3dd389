"""One pre-allocated KV cache for every strategy.

Keys are stored after RoPE, so a slot's position is its index. Each row of the batch has its own
length: slots ``[0, lengths[b])`` are valid, anything beyond is stale and masked out by the attention
mask (a query at position p sees keys at positions <= p). Cropping is therefore free: set the length
back and later writes overwrite the stale slots. Speculative strategies write draft or verification
tokens past the committed length and crop back to what was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Counters:
    """Work done through one cache, i.e. for one decode call (statistics live with the call, not the model)."""

    forward_passes: int = 0  # full-depth forward calls (prefill included)
    layer_calls: int = 0  # token rows x layers executed (compute accounting)


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # committed tokens per row
        self.max_len = max_len
        self.batch = batch
        self.counters = Counters()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, write: "WriteSpec") -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v of shape (B, KV, T, hd) at ``write``'s positions; return views of the cache
        (B, KV, S, hd) covering every slot a query of this step may attend to."""
        kc, vc = self.k[layer], self.v[layer]
        if write.start is not None:  # every row writes the same contiguous slots: a plain slice
            s = write.start
            kc[:, :, s:s + k.shape[2]] = k
            vc[:, :, s:s + v.shape[2]] = v
        else:  # ragged rows: scatter each row's tokens to its own positions
            b = write.rows  # (B, 1)
            kc[b, :, write.positions] = k.transpose(1, 2)  # indexed view is (B, T, KV, hd)
            vc[b, :, write.positions] = v.transpose(1, 2)
        return kc[:, :, :write.span], vc[:, :, :write.span]

    def crop(self, lengths: torch.Tensor | list[int] | int) -> None:
        """Forget everything past ``lengths`` (per row or one value for all rows)."""
        new = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).expand_as(self.lengths)
        if bool((new > self.lengths).any()):
            raise ValueError("crop cannot grow a row past what was written; use advance()")
        self.lengths = new.clone()

    def advance(self, counts: torch.Tensor | list[int] | int) -> None:
        """Commit ``counts`` newly written tokens per row."""
        self.lengths = self.lengths + torch.as_tensor(counts, dtype=torch.long, device=self.lengths.device)

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of slot ``src[i]`` to slot ``dst[i]`` of batch row ``rows[i]``, in every layer (all read before
        any is written): a verified draft tree's accepted path brought down to consecutive slots."""
        if rows.numel() == 0:
            return
        for t in self.k + self.v:
            t[rows, :, dst] = t[rows, :, src]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, start: int, stop: int, lengths: torch.Tensor | None = None) -> "KVCache":
        """Rows [start, stop) of this cache as a cache of their own: the same storage (writes land here), its own
        lengths (``lengths``, default these rows' current ones) and its own counters. How a server gives each
        request one row of a shared cache, and runs a step over a range of rows."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.lengths = (self.lengths[start:stop] if lengths is None else lengths).clone()
        view.max_len, view.batch = self.max_len, stop - start
        view.counters = Counters()
        return view


class WriteSpec:
    """Where one forward call writes its T tokens, and the attention mask that goes with it.

    ``positions`` (B, T) are absolute positions; a query at position p attends to cache slots
    j <= p (its own row). Built once per forward and shared by every layer.
    """

    def __init__(self, positions: torch.Tensor, max_len: int, valid: torch.Tensor | None = None):
        B, T = positions.shape
        self.positions = positions
        self.rows = torch.arange(B, device=positions.device).unsqueeze(1)
        first = positions[:, 0]
        contiguous = T == 1 or bool((positions[:, 1:] - positions[:, :-1] == 1).all())
        uniform = bool((first == first[0]).all()) and contiguous
        self.start = int(first[0]) if uniform else None
        self.span = int(positions.max()) + 1
        if self.span > max_len:
            raise ValueError(f"position {self.span - 1} is past the cache's {max_len} slots")
        if T == 1 and self.start is not None and valid is None:
            # one token per row at the same position: every key slot up to it is visible, no mask needed
            # (attention without a mask skips the mask's conversion and add in every layer)
            self.mask = None
            return
        keys = torch.arange(self.span, device=positions.device)
        # (B, 1, T, S): causal over absolute positions, per row
        mask = keys.view(1, 1, 1, -1) <= positions.view(B, 1, T, 1)
        if valid is not None:  # extra key-validity (B, S), e.g. padding inside a row
            mask = mask & valid[:, None, None, : self.span]
        self.mask = mask


class TreeMask:
    """A draft tree verified in one forward (``Transformer.forward(..., tree=)``): node 0 is each row's pending
    token, node i + 1 is draft i, whose parent is node ``parents[i] + 1`` (-1: the pending token); parents come
    before their children. The N = len(parents) + 1 nodes of row b occupy cache slots ``start[b] .. start[b] + N - 1``
    in node order and sit at RoPE position ``start[b] + depth``; each node attends to every slot before ``start[b]``
    and, among the tree's slots, to its ancestors and itself (``ancestors``: bit j set for node j, at most 64
    nodes). A chain (parents -1, 0, 1, ...) is the ordinary causal step. After verification ``KVCache.move`` copies
    the accepted path's K/V down to consecutive slots."""

    MAX_NODES = 64

    def __init__(self, parents: list[int], start: torch.Tensor):
        N = len(parents) + 1
        if N > self.MAX_NODES:
            raise ValueError(f"a draft tree has at most {self.MAX_NODES - 1} drafts, got {N - 1}")
        depth, anc = [0], [1]
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"draft {i}'s parent {p} does not come before it")
            depth.append(depth[p + 1] + 1)
            anc.append(anc[p + 1] | (1 << (i + 1)))
        self.parents = list(parents)
        self.depth = torch.tensor(depth)
        # bit 63 as the int64 sign bit: the kernel reads the same 64 bits unsigned
        self.ancestors = torch.tensor([a - (1 << 64) if a >= 1 << 63 else a for a in anc], dtype=torch.int64)
        self.start = start.to(torch.long)
        self.slots = self.start.view(-1, 1) + torch.arange(N)  # (B, N)
        self.rope_positions = self.start.view(-1, 1) + self.depth  # (B, N)

    def visible(self, span: int) -> torch.Tensor:
        """(B, 1, N, span) bool: which key slots each node's query sees."""
        N = len(self.parents) + 1
        rel = torch.arange(span).view(1, -1) - self.start.view(-1, 1)  # (B, S): slot relative to the tree's first
        sees = ((self.ancestors.view(-1, 1) >> torch.arange(N)) & 1).bool()  # (N, N): node t sees node j
        inside = sees[:, rel.clamp(0, N - 1)].transpose(0, 1) & ((rel >= 0) & (rel < N)).unsqueeze(1)  # (B, N, S)
        return ((rel < 0).unsqueeze(1) | inside).unsqueeze(1)
