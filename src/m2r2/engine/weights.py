"""Weight formats: how a ``Linear`` stores its weight and computes ``x W^T`` from it.

A format is one object in one registry (``FORMATS``): its name, the bytes it reads per weight, how it derives
its copy of a linear layer's float32 weight (at the load boundary, or on first use, never inside a timed
step) and its product for a decode-sized step. Today: ``fp32`` (the exact weights, m2r2's own layouts),
``fp16`` and ``int8`` (reduced-precision copies, float32 activations, through FBGEMM, and for fp16 one row
through the native kernels). A new format (the GGUF block formats next) is one class plus one
``register_format`` call.

Which format a product uses is decided per call, never by flipping the shared model: each ``Linear`` has a
default (set once when the model is loaded, ``Transformer.set_weights``), and ``using(name)`` overrides it
for the code inside the block *in this thread only* (a ``contextvars.ContextVar``), which is how a drafter
runs the model from another format while another thread decodes from the float32 weights.
``StepContext.weights`` records the override active when a step starts, for the native block kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
import torch
from torch import nn

from ..errors import WeightFormatError

# formats serve ``engine.model.Linear`` (annotated as nn.Module: engine.model imports this module, not the reverse)
warnings.filterwarnings("ignore", message=r".*fbgemm.*deprecated", category=UserWarning)  # the entry points we use


def lowp_available() -> bool:
    """Whether this PyTorch build has FBGEMM's packed kernels (x86 CPU builds), which fp16 and int8 use."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class WeightFormat:
    """One way of storing a linear layer's weight. Subclasses set ``name`` and ``bytes_per_weight`` and
    implement ``build`` and ``product``; ``native_weight`` is what the native kernels read, if anything."""

    name: str = ""
    bytes_per_weight: float = 4.0
    exact: bool = False  # equal to the float32 model up to summation order
    # products of any number of rows (prefills too) run in this format; otherwise only decode-sized steps do
    # (up to Linear.GEMM_ROWS rows) and longer ones run the float32 GEMM
    any_rows: bool = False
    native_max_rows: int = 0  # steps below this many token rows may run the native block kernels (beyond 16)
    # a causal forward of this many tokens per sequence (a prompt) runs layer by layer with the format's prefill
    # products (GGUF: dequantise + GEMM, gguf_weights.prefill_products); 0: never
    prefill_rows: int = 0

    def available(self) -> bool:
        return True

    def built(self, lin: "nn.Module") -> bool:
        return self.name in lin.lowp

    def build(self, lin: "nn.Module") -> None:
        """Derive this format's copy of ``lin``'s float32 weight (idempotent)."""
        raise NotImplementedError

    def product(self, lin: "nn.Module", x2: torch.Tensor) -> torch.Tensor:
        """(N, in) float32 -> (N, out) float32 for a decode-sized N, bias included."""
        raise NotImplementedError

    def native_weight(self, lin: "nn.Module") -> torch.Tensor | None:
        """The (in, out) tensor the native kernels stream for this format, or None (they do not serve it)."""
        return None

    def native_kind(self, lin: "nn.Module") -> int:
        """The kernels' code for what ``native_weight`` holds (kernels/decode.c: KIND_*)."""
        return 1 if self.name == "fp16" else 0

    def prefill(self):
        """A context manager for the products of a prompt's forward (``prefill_rows``); default: nothing changes."""
        return contextlib.nullcontext()

    def native_block_ready(self, blk) -> bool:
        """Whether the native block kernel can run block ``blk``'s linears (``blk._NATIVE_LINEARS``) from this format."""
        return all(self.native_weight(blk._modules[n]) is not None for n in blk._NATIVE_LINEARS)

    def __repr__(self) -> str:
        return f"WeightFormat({self.name!r}, {self.bytes_per_weight} bytes/weight)"


class Float32(WeightFormat):
    """The float32 weights themselves (every ``Linear``'s own layouts: see ``engine.model.Linear``)."""

    name, bytes_per_weight, exact = "fp32", 4.0, True

    def built(self, lin: "nn.Module") -> bool:
        return True

    def build(self, lin: "nn.Module") -> None:
        pass

    def product(self, lin, x2):  # never called: ``Linear.forward`` runs its float32 layouts itself
        raise AssertionError("fp32 products run in Linear.forward")

    def native_weight(self, lin):
        return lin.float_weight()

    def native_block_ready(self, blk) -> bool:  # every block has float32 weights (checked per block every step)
        return True


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool) for fp16 products split across threads
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:  # two decoding threads may ask at once: one pool, grown under the lock
        if _POOL is None or _POOL[0] < workers:
            _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="m2r2-fp16"))
        return _POOL[1]


class _Fbgemm(WeightFormat):
    """A reduced-precision copy derived from the float32 weight through FBGEMM's packing (x86 PyTorch builds)."""

    def available(self) -> bool:
        return lowp_available()

    def build(self, lin: "nn.Module") -> None:
        if self.name not in lin.lowp:
            self.derive(lin, lin.dense().detach().float().contiguous())

    def derive(self, lin: "nn.Module", dense: torch.Tensor) -> None:
        """Store this format's copy of ``dense`` (out, in) float32 in ``lin.lowp[self.name]``."""
        raise NotImplementedError


class Float16(_Fbgemm):
    """fp16 weights, float32 activations and sums: FBGEMM's packed fp16 product for several rows, the native
    kernels (the ``half`` copy, (in, out)) for one. FBGEMM's fp16 kernel runs on one thread, so a big weight
    is packed in one chunk of output rows per thread and the chunks run side by side (the op releases the
    GIL): the LM head of the embedded model, 57 MB in fp16, takes 1.9 ms instead of 3.4 on 2 cores. Split only
    from ``Linear.FP16_SPLIT_MIN`` weights up (see there)."""

    name, bytes_per_weight = "fp16", 2.0

    def derive(self, lin: "nn.Module", dense: torch.Tensor) -> None:
        from . import native
        n = lin.parts if lin.out_features * lin.in_features >= type(lin).FP16_SPLIT_MIN else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chunks = [torch.fbgemm_pack_gemm_matrix_fp16(c.contiguous()) for c in dense.chunk(n)]
        if native.available():  # what the native kernels read (one row: ~2x faster than FBGEMM)
            lin.half = lin.float_weight().detach().reshape(lin.in_features, lin.out_features).half()
        lin.lowp[self.name] = chunks

    def product(self, lin: "nn.Module", x2: torch.Tensor) -> torch.Tensor:
        chunks = lin.lowp[self.name]
        f = torch.fbgemm_linear_fp16_weight_fp32_activation
        x2 = x2.contiguous()
        if len(chunks) == 1:
            y = f(x2, chunks[0], None)
        else:
            futures = [_pool(len(chunks) - 1).submit(f, x2, c, None) for c in chunks[1:]]
            y = torch.cat([f(x2, chunks[0], None), *(fu.result() for fu in futures)], -1)
        return y if lin.bias is None else y + lin.bias

    def native_weight(self, lin):
        return lin.half


class Int8(_Fbgemm):
    """int8 weights (symmetric, one scale per output row), activations quantized per call (FBGEMM dynamic
    quantization)."""

    name, bytes_per_weight = "int8", 1.0

    def derive(self, lin: "nn.Module", dense: torch.Tensor) -> None:
        scale = (dense.abs().amax(1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # quantized tensors warn that they are deprecated
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(dense, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            bias = None if lin.bias is None else lin.bias.detach().float()
            lin.lowp[self.name] = torch.ops.quantized.linear_prepack(q, bias)

    def product(self, lin: "nn.Module", x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x2.contiguous(), lin.lowp[self.name], True)  # bias is packed


class GGUFBlocks(WeightFormat):
    """The GGUF file's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K), read from the file at load
    (``attach_gguf_blocks`` in ``engine/gguf_weights.py``; ``m2r2.load(weights="gguf")``), never derived from the
    float32 weights. A block is dequantised in the kernel to exactly the float32 model's weights and multiplied in
    float32, so the products are the float32 model's up to the order of summation, while a step reads ~1/6 of the
    bytes. Each linear keeps ``lowp["gguf"]``, a ``gguf_weights.BlockWeight``."""

    name, bytes_per_weight, exact = "gguf", 0.625, True  # nominal (Q4_1); BlockWeight.nbytes has a layer's own
    any_rows = True  # products of any number of rows run on the blocks (no float32 copy needed)
    # a step of up to 127 rows runs the native block kernel (each row's bits independent of the others); a longer
    # one the PyTorch path, whose products dequantise each weight for a GEMM (gguf_weights.BlockWeight.GEMM_ROWS)
    native_max_rows = 128
    # a prompt of 20+ tokens (Transformer.hidden(prompt=True)): dequantise + oneDNN's GEMM (gguf_weights.gemm).
    # Measured on 2 cores, embedded model, ms per prefill, native block kernels / dequantise + GEMM (ad-hoc check,
    # the benchmark is prefill-by-length): 8 tokens 11 / 21, 16: 19 / 24, 20: 27 / 26, 24: 48 / 29, 36: 68 / 35,
    # 100: 188 / 71, 512: 761 / 390
    prefill_rows = 20

    def available(self) -> bool:
        from . import native
        return native.available()

    def build(self, lin: "nn.Module") -> None:
        if self.name not in lin.lowp:
            raise WeightFormatError("gguf weights are the GGUF file's own blocks: load a GGUF model with "
                                    "m2r2.load(..., weights='gguf')")

    def product(self, lin: "nn.Module", x2: torch.Tensor) -> torch.Tensor:
        return lin.lowp[self.name].product(x2.contiguous(), lin.bias, lin.out_features)

    def native_weight(self, lin):
        entry = lin.lowp.get(self.name)
        return None if entry is None else entry.native

    def native_kind(self, lin) -> int:
        return lin.lowp[self.name].kind

    def native_block_ready(self, blk) -> bool:
        return all(self.name in blk._modules[n].lowp for n in blk._NATIVE_LINEARS)

    def prefill(self):
        from .gguf_weights import prefill_products
        return prefill_products()


FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Add a weight format (by its ``name``); returns it."""
    if not fmt.name:
        raise ValueError("a weight format needs a name")
    FORMATS[fmt.name] = fmt
    return fmt


for _f in (Float32(), Float16(), Int8(), GGUFBlocks()):
    register_format(_f)
FP32 = FORMATS["fp32"]


def names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get(name: "str | WeightFormat") -> WeightFormat:
    """The format called ``name``; one error type (``WeightFormatError``) for an unknown or unusable one."""
    if isinstance(name, WeightFormat):
        return name
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise WeightFormatError(f"weights must be one of {list(FORMATS)}, got {name!r}")
    if not fmt.available():
        raise WeightFormatError(f"{name} weights need PyTorch's FBGEMM kernels (x86 CPU builds), which this "
                                "build lacks")
    return fmt


def bytes_per_weight(name: str) -> float:
    return get(name).bytes_per_weight


_ACTIVE: contextvars.ContextVar[WeightFormat | None] = contextvars.ContextVar("m2r2_weights", default=None)


def active() -> WeightFormat | None:
    """The format ``using`` selected in this thread (None: each layer's default)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using(fmt: "str | WeightFormat | None"):
    """Run the products inside the block from ``fmt`` (this thread only; None: each layer's default). The
    copies must have been built (``Transformer.build_weights``)."""
    token = _ACTIVE.set(None if fmt is None else get(fmt))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
