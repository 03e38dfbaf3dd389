"""The family's own K/V cache: ragged, per block application (the adaptive-depth models write K/V only for
the tokens that ran each application), unlike the engine's one pre-allocated cache (``m2r2.engine.cache``)."""

from __future__ import annotations

import torch

from ..errors import M2R2Error


class RaggedKVCache:
    """Per block-application K/V holding only the tokens that ran that application.

    Slot s keeps k, v (B, H, N_s, hd), the absolute position of each entry (B, N_s) and whether it is
    real (B, N_s): rows of a batch append different numbers of tokens per call, the shorter ones padded
    with invalid entries (masked out, not counted in ``nbytes``). Entries are appended in call order, so
    a cache grows by exactly what the tokens that ran each application wrote."""

    def __init__(self, n_slots: int, batch: int):
        self.k: list[torch.Tensor | None] = [None] * n_slots
        self.v: list[torch.Tensor | None] = [None] * n_slots
        self.pos: list[torch.Tensor | None] = [None] * n_slots
        self.valid: list[torch.Tensor | None] = [None] * n_slots
        self.batch = batch
        self.seen = torch.zeros(batch, dtype=torch.long)  # tokens fed so far per row (next position)

    def append(self, slot: int, k, v, pos, valid):
        if self.k[slot] is None:
            self.k[slot], self.v[slot], self.pos[slot], self.valid[slot] = k, v, pos, valid
        else:
            self.k[slot] = torch.cat((self.k[slot], k), 2)
            self.v[slot] = torch.cat((self.v[slot], v), 2)
            self.pos[slot] = torch.cat((self.pos[slot], pos), 1)
            self.valid[slot] = torch.cat((self.valid[slot], valid), 1)
        return self.read(slot)

    def read(self, slot: int):
        if self.k[slot] is None:
            raise M2R2Error(f"K/V slot {slot} is empty: the application it shares from has not run")
        return self.k[slot], self.v[slot], self.pos[slot], self.valid[slot]

    def entries(self) -> list[int]:
        """Real (token, application) K/V entries per slot, over the whole batch."""
        return [0 if v is None else int(v.sum()) for v in self.valid]

    def nbytes(self) -> int:
        """Bytes a compact cache needs: real entries x (K and V) x heads x head_dim x element size."""
        total = 0
        for k, v in zip(self.k, self.valid):
            if k is not None:
                total += int(v.sum()) * 2 * k.shape[1] * k.shape[3] * k.element_size()
        return total
