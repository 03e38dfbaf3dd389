"""Native decode kernels (``kernels/decode.c``): a decode-sized step (up to 16 token rows) through a whole
decoder block, and the few-row product of any other linear layer, each one C call.

The C source ships with the package and is compiled on first use with the host C compiler into the
user cache (``<cache>/kernels/``, keyed by the source, compiler and CPU), then loaded with ctypes; later
processes load the cached library directly. Nothing here is required: without a compiler, on a
platform the build does not support, or with ``M2R2_NATIVE=0``, every call site keeps the PyTorch path,
and ``disabled()`` turns the kernels off for a block of code (tests and benchmarks compare the two).

The kernels serve only what they are exact for: float32 activations on CPU (float32 weights, the fp16 copies
in fp16 mode, or a GGUF's own blocks, kernels/qblocks.h), steps under the cache's causal rule (or a draft tree's
mask, ``m2r2.engine.cache.TreeMask``) of up to 16 token rows (a decode step of one sequence or of a ragged batch, a
speculative verification, a short prefill; on GGUF blocks up to 127), nothing to differentiate; ``blocks`` runs the
whole stack of a full-depth step in one call.
Results equal the PyTorch path up to the order of float32 summation.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from .blocks import BLOCK_FORMATS

SOURCE = Path(__file__).with_name("kernels") / "decode.c"
# M2R2_NATIVE_MARCH: the -march target (default the build machine's own; e.g. x86-64, x86-64-v3 to build
# and test the SSE2-only or AVX2 code on an AVX-512 machine); part of the flags, so of the cache key
# M2R2_NATIVE_PORTABLE=1: the plain C block loops instead of the AVX2 / AVX-512 intrinsics (tests compare them)
FLAGS = ["-O3", f"-march={os.environ.get('M2R2_NATIVE_MARCH') or 'native'}", "-fopenmp", "-fPIC", "-shared",
         "-std=c11", *(["-DM2R2_PORTABLE"] if os.environ.get("M2R2_NATIVE_PORTABLE") == "1" else [])]

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
# on/off: the environment sets the default (M2R2_NATIVE=0: off); ``set_enabled`` / ``disabled`` change it for the
# calling thread only (a ContextVar), so one request comparing the two paths never switches another's
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "m2r2_native", default=os.environ.get("M2R2_NATIVE", "1") != "0")
KINDS = {torch.float32: 0, torch.float16: 1}  # weight storage the kernels read (kernels/decode.c: KIND_*)


class Dims(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("kind_qkv", ctypes.c_int), ("kind_o", ctypes.c_int),
                ("kind_gate_up", ctypes.c_int), ("kind_down", ctypes.c_int)]


class Weights(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("in_norm", "post_norm", "qkv", "qkv_b", "o", "o_b", "gate_up",
                                               "gate_up_b", "down", "down_b")]


def _cpu_key() -> str:
    try:  # -march=native code is only valid on a CPU with the same features
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def library_path(cc: str) -> Path:
    from ..artifacts import cache_root
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    sources = [p.read_text() for p in sorted(SOURCE.parent.glob("*.[ch]"))]  # decode.c and what it includes
    key = hashlib.sha256("\0".join([*sources, cc, version, " ".join(FLAGS), _cpu_key(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"decode-{key}.so"


def _build() -> ctypes.CDLL:
    if sys.platform not in ("linux", "darwin"):
        raise RuntimeError(f"native kernels are built on Linux and macOS only, not {sys.platform}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    path = library_path(cc)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # compile aside, then rename into place
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                               timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-500:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))  # after torch: its libgomp is the one OpenMP resolves to
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.m2r2_gemv.argtypes = [P, I, P, I, P, P, P, I, I, I]
    lib.m2r2_gemv.restype = None
    lib.m2r2_block.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(Weights), P, I, P, P, P, P, P, P, P, P, I, P, I]
    lib.m2r2_block.restype = None
    lib.m2r2_blocks.argtypes = [I, P, P, P, I, P, P, P, P, P, P, P, P, I, P, I]
    lib.m2r2_blocks.restype = None
    lib.m2r2_block_scratch.argtypes = [ctypes.POINTER(Dims), I, I, I]
    lib.m2r2_block_scratch.restype = ctypes.c_long
    lib.m2r2_qgemv.argtypes = [P, I, P, I, P, P, I, I, I]
    lib.m2r2_qgemv.restype = None
    lib.m2r2_qdequant.argtypes = [P, I, I, I, P, I]
    lib.m2r2_qdequant.restype = None
    lib.m2r2_moe_attention.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(Weights), P, I, P, P, P, P, P, P, P, P,
                                       I, P, P, I, P, P, P, I]
    lib.m2r2_moe_attention.restype = None
    lib.m2r2_experts.argtypes = [I, P, P, I, P, I, P, P, P, P, I, I, P, I]
    lib.m2r2_experts.restype = None
    lib.m2r2_fast_scratch.argtypes = [I, I, I, I]
    lib.m2r2_fast_scratch.restype = ctypes.c_long
    lib.m2r2_fast_blocks.argtypes = [I, P, P, P, P, P, I, ctypes.c_float, I, P, I, P, P, P, P, P, P, I, P,
                                     ctypes.c_long, I]
    lib.m2r2_fast_blocks.restype = None
    lib.m2r2_experts_scratch.argtypes = [I, I, I, I]
    lib.m2r2_experts_scratch.restype = ctypes.c_long
    lib.m2r2_fma_rate.argtypes = [ctypes.c_long, I]
    lib.m2r2_fma_rate.restype = ctypes.c_double
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first call; None (once reported on stderr) if they cannot be."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _build()
                except Exception as e:  # any failure: keep the PyTorch path, say why once
                    print(f"m2r2: native decode kernels unavailable ({e}); using the PyTorch path",
                          file=sys.stderr, flush=True)
                _tried = True
    return _lib


def available() -> bool:
    """Whether call sites may use the kernels now: switched on, and built (on the first call)."""
    return _ENABLED.get() and (_lib is not None or library() is not None)


def set_enabled(on: bool) -> bool:
    """Switch the kernels on or off for the calling thread; returns the previous setting."""
    prev = _ENABLED.get()
    _ENABLED.set(bool(on))
    return prev


@contextlib.contextmanager
def disabled():
    """Run the block on the PyTorch path (e.g. to compare against it), in this thread."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


# ---- call sites ----
_scratch: dict[int, torch.Tensor] = {}


def scratch(n: int) -> torch.Tensor:
    """A float32 work buffer of at least n floats, one per Python thread that asks (grown, never shrunk;
    the kernels run inside the call, so a thread's buffer is never in use twice)."""
    key = threading.get_ident()
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = _scratch[key] = torch.empty(max(n, 1 << 16), dtype=torch.float32)
    return buf


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (rows, in) float32, contiguous @ weight ((in, out) row-major, contiguous; float32 or float16) + bias
    (float32) -> (rows, out) float32, accumulated in float32, on every intra-op thread. Meant for a few rows
    (decode, verification): the weight is read from memory once for all of them."""
    lib = _lib
    threads = torch.get_num_threads()
    rows = x.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.float32)
    part = scratch(threads * rows * out_features)
    lib.m2r2_gemv(x.data_ptr(), rows, weight.data_ptr(), KINDS[weight.dtype],
                  None if bias is None else bias.data_ptr(), y.data_ptr(), part.data_ptr(), x.shape[1], out_features,
                  threads)
    return y


# GGUF block formats the kernels run -> kernels/qblocks.h KIND_* (layouts: blocks.py)
BLOCK_KINDS = {"q4_1": 2, "q8_0": 3, "q4_0": 4, "q5_0": 5, "q5_1": 6, "q4_k": 7, "q6_k": 8}
KIND_SEGMENTS = 9  # a fused linear of row segments in different block formats (qblocks.h: m2r2_qseg)


class _QSeg(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int), ("rows", ctypes.c_int)]


def segment_table(parts: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The kernel's description of a linear stored as consecutive row segments ``parts`` ((format, (rows, bytes per
    row) uint8 blocks), in output-row order), as a uint8 tensor to pass with kind ``KIND_SEGMENTS``. It points into
    the parts' tensors: keep them alive as long as the table."""
    table = (_QSeg * (len(parts) + 1))(*[_QSeg(b.data_ptr(), BLOCK_KINDS[f], b.shape[0]) for f, b in parts],
                                       _QSeg(None, 0, 0))
    return torch.frombuffer(bytearray(bytes(table)), dtype=torch.uint8)


def qgemv(x: torch.Tensor, blocks: torch.Tensor, fmt: str, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (rows, in) float32, contiguous @ W^T + bias, W as GGUF blocks: ``blocks`` (out, in / weights per block *
    bytes per block) uint8, contiguous, in format ``fmt`` (a key of ``BLOCK_KINDS``) -> (rows, out) float32. Each
    block is dequantised to the float32 weights exactly and summed in float32 (kernels/qblocks.h); any number of
    rows (up to 8 per pass over the weights on AVX-512)."""
    f = BLOCK_FORMATS[fmt.upper()]
    rows, in_f = x.shape
    if in_f % f.weights_per_block or blocks.dtype != torch.uint8 or not blocks.is_contiguous() \
            or tuple(blocks.shape) != (out_features, in_f // f.weights_per_block * f.bytes_per_block):
        raise ValueError(f"qgemv: x {tuple(x.shape)}, blocks {tuple(blocks.shape)} do not fit {fmt}")
    return qgemv_kind(x, blocks, BLOCK_KINDS[fmt], bias, out_features)


def qgemv_kind(x: torch.Tensor, w: torch.Tensor, kind: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``qgemv`` by kernel kind, unchecked: ``w`` blocks of kind ``kind``, or a ``segment_table`` (``KIND_SEGMENTS``)."""
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    _lib.m2r2_qgemv(x.data_ptr(), x.shape[0], w.data_ptr(), kind, None if bias is None else bias.data_ptr(),
                    y.data_ptr(), x.shape[1], out_features, torch.get_num_threads())
    return y


def qdequant(blocks: torch.Tensor, fmt: str, rows: int, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF blocks ``blocks`` (rows, bytes per row) uint8 in format ``fmt`` -> float32 (rows, in_features), exactly
    the reference dequantiser's values (``blocks.dequantize``), on every intra-op thread; into ``out`` if given."""
    f = BLOCK_FORMATS[fmt.upper()]
    if tuple(blocks.shape) != (rows, in_features // f.weights_per_block * f.bytes_per_block) or in_features % \
            f.weights_per_block or blocks.dtype != torch.uint8 or not blocks.is_contiguous():
        raise ValueError(f"qdequant: blocks {tuple(blocks.shape)} do not hold {rows} x {in_features} {fmt}")
    if out is not None and (tuple(out.shape) != (rows, in_features) or out.dtype != torch.float32
                            or not out.is_contiguous()):
        raise ValueError(f"qdequant: out {tuple(out.shape)} {out.dtype} is not a contiguous float32 "
                         f"{rows} x {in_features} tensor")
    y = torch.empty(rows, in_features, dtype=torch.float32) if out is None else out
    _lib.m2r2_qdequant(blocks.data_ptr(), BLOCK_KINDS[fmt], rows, in_features, y.data_ptr(), torch.get_num_threads())
    return y


def fma_rate(threads: int, iters: int = 2_000_000) -> float:
    """Float32 multiply-adds per second this machine sustains on ``threads`` threads (the compute floor of a
    product: rows x weights multiply-adds at this rate)."""
    return library().m2r2_fma_rate(iters, threads)


# block -> {half: (weight pointers, ctypes args)}; kept outside the block so that copies and pickles of a
# model never meet ctypes objects
_ARGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _block_args(blk, fmt) -> tuple:
    """The ctypes structs describing block ``blk`` with its weights in format ``fmt`` (``m2r2.engine.weights``:
    what ``fmt.native_weight`` gives for each linear, of kind ``fmt.native_kind``), cached per block and format
    and rebuilt if a tensor changed. Runs once per block per step, so the tensors are read from the modules'
    dicts directly rather than through nn.Module attribute lookup."""
    mods = blk._modules
    norms = (mods["input_norm"]._parameters["weight"], mods["post_norm"]._parameters["weight"])
    params = [*norms]
    for name in ("qkv", "o", "gate_up", "down"):
        lin = mods[name]
        params += fmt.native_weight(lin), lin._parameters.get("bias")
    ptrs = tuple(None if p is None else p.data_ptr() for p in params)
    per_block = _ARGS.get(blk)
    if per_block is None:
        per_block = _ARGS[blk] = {}
    cached = per_block.get(fmt.name)
    if cached is not None and cached[0] == ptrs:
        return cached[1]
    c = blk.cfg
    dims = Dims(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.rms_norm_eps,
                blk.scale, *(fmt.native_kind(mods[n]) for n in ("qkv", "o", "gate_up", "down")))
    wts = Weights(*ptrs)
    args = (ctypes.byref(dims), ctypes.byref(wts), dims, wts)
    per_block[fmt.name] = (ptrs, args)
    return args


def _attention_args(blk, fmt) -> tuple:
    """``_block_args`` for the attention half of a block whose FFN is not the kernel's (an MoE block): the MLP's
    size is 0 and its weights absent, so the kernel stops after x + Attn(norm(x))."""
    mods = blk._modules
    params = [mods["input_norm"]._parameters["weight"], mods["post_norm"]._parameters["weight"]]
    for name in ("qkv", "o"):
        lin = mods[name]
        params += fmt.native_weight(lin), lin._parameters.get("bias")
    params += [None] * 4
    ptrs = tuple(None if p is None else p.data_ptr() for p in params)
    per_block = _ARGS.get(blk)
    if per_block is None:
        per_block = _ARGS[blk] = {}
    key = ("attention", fmt.name)
    cached = per_block.get(key)
    if cached is not None and cached[0] == ptrs:
        return cached[1]
    c = blk.cfg
    dims = Dims(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, 0, c.rms_norm_eps, blk.scale,
                fmt.native_kind(mods["qkv"]), fmt.native_kind(mods["o"]), 0, 0)
    wts = Weights(*ptrs)
    args = (ctypes.byref(dims), ctypes.byref(wts), dims, wts)
    per_block[key] = (ptrs, args)
    return args


def attention(blk, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              rows: tuple, fmt, router: torch.Tensor,
              router_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE block's first half (``block``'s arguments, for a block whose FFN is experts): the new states
    x + Attn(input_norm(x)) (B, T, D) with the K/V written to the cache, the FFN input h = post_norm(those states)
    (B*T, D), and the router's logits (B*T, E) from ``router`` (D, E) float32 contiguous and ``router_b`` (E) or
    None. Needs only the block's input_norm, qkv, o and post_norm. E must not exceed the q/k/v width."""
    lib = _lib
    dims_p, weights_p, _, _ = _attention_args(blk, fmt)
    threads = torch.get_num_threads()
    n, max_len = x.shape[0] * x.shape[1], k.shape[2]
    E = router.shape[1]
    buf = scratch(lib.m2r2_block_scratch(dims_p, n, max_len, threads))
    y = x.clone(memory_format=torch.contiguous_format)
    h = torch.empty(n, x.shape[-1], dtype=torch.float32)
    logits = torch.empty(n, E, dtype=torch.float32)
    lib.m2r2_moe_attention(dims_p, weights_p, y.data_ptr(), n, *_row_ptrs(rows),
                           cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(), max_len, router.data_ptr(),
                           None if router_b is None else router_b.data_ptr(), E, h.data_ptr(), logits.data_ptr(),
                           buf.data_ptr(), threads)
    return y, h, logits


def experts(h: torch.Tensor, weights: list[tuple[int, int]], kind: int, sel: torch.Tensor,
            wts: torch.Tensor | None, out: torch.Tensor, n: int, resid: torch.Tensor | None = None) -> torch.Tensor:
    """An MoE layer's experts on rows h (T, D) float32 contiguous, accumulated into ``out`` (T, D) float32
    contiguous, in the order given: ``weights`` the (gate+up, down) data pointers of each expert, of kernel kind
    ``kind`` (0: float32 (in, out) row-major; a ``BLOCK_KINDS`` value: GGUF blocks, out rows of blocks); ``sel``
    (T, len(weights)) uint8, which rows run each expert; ``wts`` the same shape in float32 (each expert's output
    scaled per row), or None for a plain sum. n: neurons per expert. ``resid`` (T, D) contiguous, if given, then
    gets ``out`` added (the block's residual). The caller keeps the weights alive."""
    lib = _lib
    T, D = h.shape
    m = len(weights)
    threads = torch.get_num_threads()
    buf = scratch(lib.m2r2_experts_scratch(T, D, n, threads))
    gu = (ctypes.c_void_p * m)(*[w[0] for w in weights])
    dn = (ctypes.c_void_p * m)(*[w[1] for w in weights])
    lib.m2r2_experts(m, gu, dn, kind, h.data_ptr(), T, sel.data_ptr(), None if wts is None else wts.data_ptr(),
                     out.data_ptr(), None if resid is None else resid.data_ptr(), D, n, buf.data_ptr(), threads)
    return out


def rows_of(positions: torch.Tensor, tree=None) -> tuple:
    """The (batch row, cache slot) of every token row of a (B, T) step, as the int32 arrays ``block`` takes, and for a
    draft tree (an ``m2r2.engine.cache.TreeMask``) each row's first tree slot (int32) and ancestor bits (64-bit);
    None, None under the plain causal rule."""
    B, T = positions.shape
    rows = (torch.arange(B, dtype=torch.int32).repeat_interleave(T), positions.reshape(-1).to(torch.int32).contiguous())
    if tree is None:
        return (*rows, None, None)
    return (*rows, tree.start.to(torch.int32).repeat_interleave(T).contiguous(),
            tree.ancestors.repeat(B).contiguous())


def _row_ptrs(rows: tuple) -> list:
    return [None if t is None else t.data_ptr() for t in rows]


def block(blk, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          rows: tuple, fmt) -> torch.Tensor:
    """A (B, T) step (x: (B, T, D) float32; B*T rows, at most a few) through block ``blk`` under the cache's
    causal rule: each token's K/V go into its batch row's slot of the layer's cache tensors k, v (B, KV,
    max_len, hd), and it attends to that row's slots up to its position. ``rows``: ``rows_of(positions)``.
    From the linears' weights in format ``fmt`` (an ``m2r2.engine.weights`` format). cos, sin: (B, T, hd)
    contiguous. Returns the new states."""
    lib = _lib
    dims_p, weights_p, dims, _ = _block_args(blk, fmt)
    threads = torch.get_num_threads()
    n, max_len = x.shape[0] * x.shape[1], k.shape[2]
    buf = scratch(lib.m2r2_block_scratch(dims_p, n, max_len, threads))
    y = x.clone(memory_format=torch.contiguous_format)
    lib.m2r2_block(dims_p, weights_p, y.data_ptr(), n, *_row_ptrs(rows), cos.data_ptr(),
                   sin.data_ptr(), k.data_ptr(), v.data_ptr(), max_len, buf.data_ptr(), threads)
    return y


# model -> {(format name, depth): (per-block arg tuples, ctypes pointer arrays, widest dims)}: a stack's structs (the
# whole model's, a fast stream's first blocks), rebuilt when any block's are
_STACK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _stack(model, fmt, n: int) -> tuple:
    """The first ``n`` blocks of ``model`` as the stack kernels take them in format ``fmt``: the ctypes arrays of their
    dims and weights structs, the one needing the most scratch per row (the same one for any row count and cache
    length), and the cache pointer arrays' length. Cached per model, format and depth; rebuilt when any block's
    structs are."""
    args = [_block_args(blk, fmt) for blk in model.layers[:n]]
    per_model = _STACK.get(model)
    if per_model is None:
        per_model = _STACK[model] = {}
    cached = per_model.get((fmt.name, n))
    if cached is None or any(a is not b for a, b in zip(cached[0], args)):
        dims = (ctypes.c_void_p * n)(*[ctypes.addressof(a[2]) for a in args])
        ws = (ctypes.c_void_p * n)(*[ctypes.addressof(a[3]) for a in args])
        widest = max(args, key=lambda a: _lib.m2r2_block_scratch(a[0], 1, 0, 1))[0]
        cached = per_model[(fmt.name, n)] = (args, dims, ws, widest)
    return cached[1:]


def _cache_ptrs(cache, n: int) -> tuple:
    """The first ``n`` layers' K and V cache tensors as ctypes pointer arrays."""
    return ((ctypes.c_void_p * n)(*[t.data_ptr() for t in cache.k[:n]]),
            (ctypes.c_void_p * n)(*[t.data_ptr() for t in cache.v[:n]]))


def blocks(model, x: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor,
           rows: tuple, fmt) -> torch.Tensor:
    """Every block of ``model`` in turn on a (B, T) step (``block``'s arguments, for all layers: ``cache`` the
    model's KVCache), in one C call and one parallel region: what ``block`` layer by layer computes, bit for bit,
    without a return to Python (and an idle thread team) between blocks. Returns the final states."""
    lib = _lib
    n = len(model.layers)
    dims, ws, widest = _stack(model, fmt, n)
    kc, vc = _cache_ptrs(cache, n)
    threads = torch.get_num_threads()
    rows_n, max_len = x.shape[0] * x.shape[1], cache.k[0].shape[2]
    buf = scratch(lib.m2r2_block_scratch(widest, rows_n, max_len, threads))
    y = x.clone(memory_format=torch.contiguous_format)
    lib.m2r2_blocks(n, dims, ws, y.data_ptr(), rows_n, *_row_ptrs(rows), cos.data_ptr(),
                    sin.data_ptr(), kc, vc, max_len, buf.data_ptr(), threads)
    return y


def fast_blocks(model, adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], eps: float, rms_scaled: bool,
                x: torch.Tensor, cache, cos: torch.Tensor, sin: torch.Tensor, rows: tuple, fmt) -> torch.Tensor:
    """The M2R2 fast stream's first ``len(adapters)`` layers on a (B, T) step under the causal rule (``blocks``'
    arguments), in one C call: each layer's block as ``block`` computes it, plus its accelerator adapter on the layer's
    input, ``adapters[l]`` = (norm weight (D), down (D, rank), up (rank, D)) float32 contiguous, (in, out) row-major.
    Returns the fast states after the last of them."""
    lib = _lib
    n = len(adapters)
    dims, ws, widest = _stack(model, fmt, n)
    norm, down, up = ((ctypes.c_void_p * n)(*[a[i].data_ptr() for a in adapters]) for i in range(3))
    kc, vc = _cache_ptrs(cache, n)
    threads = torch.get_num_threads()
    rows_n, max_len = x.shape[0] * x.shape[1], cache.k[0].shape[2]
    rank = adapters[0][1].shape[1]
    block_scratch = lib.m2r2_block_scratch(widest, rows_n, max_len, threads)
    buf = scratch(block_scratch + lib.m2r2_fast_scratch(rows_n, x.shape[-1], rank, threads))
    y = x.clone(memory_format=torch.contiguous_format)
    lib.m2r2_fast_blocks(n, dims, ws, norm, down, up, rank, eps, int(rms_scaled), y.data_ptr(), rows_n,
                         rows[0].data_ptr(), rows[1].data_ptr(), cos.data_ptr(), sin.data_ptr(), kc, vc, max_len,
                         buf.data_ptr(), block_scratch, threads)
    return y
