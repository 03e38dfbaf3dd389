"""Slow memory for the expert hierarchy (``m2r2.moe.memory``): where experts live until a slot of fast memory
holds them, and how long bringing one over takes. Two kinds:

* ``LinkStore``: experts in host RAM behind a *modelled link* with a bandwidth and a per-transfer latency
  (flash to DRAM on a phone, host to HBM over PCIe). The link is a FIFO queue: when a load is requested
  its completion time is fixed on the link's own timeline (``latency + bytes / bandwidth`` after the link
  is free), and the data is copied into its slot by the background loader, which takes every queued
  request in one multi-tensor copy. The compute thread waits until both the copy is done and the modelled
  time has come. (A first version slept in the loader per transfer; on a busy 2-core machine its ~6 wake-ups
  per millisecond of link time fought the compute thread for the GIL and slowed compute by more than the
  loads it hid.)
* ``FileStore``: one file per expert on real storage, read with ``O_DIRECT`` into the page-aligned slot
  (the page cache is bypassed, so every load is a real device read); where O_DIRECT is refused, the
  file's cached pages are dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` before each read.

``measure_storage`` reads experts once through a ``FileStore``: the storage's real GB/s and milliseconds per
expert.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import torch

from ..artifacts import atomic_write

PAGE = 4096


def padded_bytes(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


# ---------------------------------------------------------------- slow memory

class LinkStore:
    """Experts in host RAM behind a modelled link: ``bandwidth`` GB/s (1e9 B/s) and ``latency`` seconds per
    transfer."""

    kind = "link"

    def __init__(self, bank: dict[tuple[int, int], torch.Tensor], bandwidth_gbps: float, latency_s: float = 0.0):
        if bandwidth_gbps <= 0 or latency_s < 0:
            raise ValueError(f"need bandwidth > 0 and latency >= 0, got {bandwidth_gbps}, {latency_s}")
        self.bank, self.bandwidth, self.latency = bank, bandwidth_gbps * 1e9, latency_s
        self.free_at = 0.0

    def describe(self) -> dict:
        return {"kind": "link", "bandwidth_gbps": self.bandwidth / 1e9, "latency_us": self.latency * 1e6}

    def transfer_seconds(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth

    def schedule(self, nbytes: int, issued: float) -> float:
        """The modelled completion time of a transfer issued at ``issued``: the link serves transfers in the
        order they are issued (a FIFO DMA queue), each taking ``latency + bytes / bandwidth`` once the link is
        free. Computed on the compute thread when the load is requested, so the link's timing never depends
        on when the loader thread happens to be scheduled on a busy CPU."""
        start = max(self.free_at, issued)
        self.free_at = start + self.transfer_seconds(nbytes)
        return self.free_at

    def copy_many(self, keys: list[tuple[int, int]], dsts: list[torch.Tensor]) -> None:
        """The physical side of a batch of transfers: one multi-tensor copy (the GIL is released once for all
        of them, so the loader thread barely competes with the compute thread for it)."""
        srcs = [self.bank[k] for k in keys]
        torch._foreach_copy_([d[: s.numel()] for d, s in zip(dsts, srcs)], srcs)

    def close(self) -> None:
        pass


class FileStore:
    """One file per expert (``L{layer}-E{expert}.bin``, padded to whole pages) on real storage, read with
    the page cache bypassed."""

    kind = "file"

    def __init__(self, directory: str | os.PathLike, bank: dict[tuple[int, int], torch.Tensor] | None = None):
        self.dir = Path(directory)
        if bank is not None:
            self.write(bank)
        self.nbytes = None
        self.direct = hasattr(os, "O_DIRECT")
        self.fds: dict[tuple[int, int], int] = {}

    @staticmethod
    def path_for(d: Path, key: tuple[int, int]) -> Path:
        return d / f"L{key[0]:03d}-E{key[1]:04d}.bin"

    def write(self, bank: dict[tuple[int, int], torch.Tensor]) -> None:
        """Write every expert once (skipped when a file of the right size exists)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for key, t in bank.items():
            p = self.path_for(self.dir, key)
            raw = t.contiguous().numpy().tobytes()
            size = padded_bytes(len(raw))
            if p.is_file() and p.stat().st_size == size:
                continue
            atomic_write(p, raw + b"\0" * (size - len(raw)))

    def describe(self) -> dict:
        return {"kind": "file", "dir": str(self.dir),
                "page_cache_bypass": "O_DIRECT" if self.direct else "posix_fadvise(DONTNEED)"}

    def _fd(self, key) -> int:
        fd = self.fds.get(key)
        if fd is None:
            p = str(self.path_for(self.dir, key))
            if self.direct:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # e.g. tmpfs: no O_DIRECT
                    self.direct = False
            if fd is None:
                fd = os.open(p, os.O_RDONLY)
            self.fds[key] = fd
        return fd

    def load(self, key: tuple[int, int], dst_view: memoryview) -> None:
        fd = self._fd(key)
        if not self.direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        n = os.preadv(fd, [dst_view], 0)
        if n != len(dst_view):
            raise OSError(f"short read of expert {key}: {n} of {len(dst_view)} bytes")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def measure_storage(store: FileStore, keys: list[tuple[int, int]], nbytes: int) -> dict:
    """Read ``keys`` once each through the store (page cache bypassed): GB/s and milliseconds per expert."""
    buf = mmap.mmap(-1, padded_bytes(nbytes))
    mv = memoryview(buf)
    t0 = time.perf_counter()
    for k in keys:
        store.load(k, mv)
    dt = time.perf_counter() - t0
    mv.release()
    buf.close()
    return {"experts": len(keys), "gbps": len(keys) * padded_bytes(nbytes) / dt / 1e9,
            "ms_per_expert": 1e3 * dt / len(keys), "page_cache_bypass": store.describe()["page_cache_bypass"]}
