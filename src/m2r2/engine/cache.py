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
