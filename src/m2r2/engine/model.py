"""The per-layer model seam every method uses: ``embed``, ``layer(i)``, ``norm``, ``head``.

m2r2 owns its decoder blocks (mapped from a Hugging Face Llama-family checkpoint at load time) instead
of calling a library's layer internals, whose signatures change between releases. The blocks are
written for decode speed on CPU: q/k/v and gate/up are fused into single matmuls, RoPE comes from a
precomputed table, and K/V go straight into the pre-allocated ``KVCache``.

Numerics follow transformers' Llama implementation (float32 RMSNorm, same RoPE table, SDPA), so greedy
output matches ``transformers.generate`` token for token up to float ties.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import native, weights
from .weights import FORMATS, FP32, lowp_available  # noqa: F401  (lowp_available: re-exported)
from .cache import KVCache, TreeMask, WriteSpec
from .config import ModelConfig

_MATERIALIZE = threading.Lock()  # one thread dequantises a layer's float32 weight (Linear.float_weight)

# The formats a ``Linear`` can run from (m2r2.engine.weights: fp32, fp16, int8, ...), by name
WEIGHT_KINDS = weights.names()
_BUILD_LOCK = threading.Lock()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same arithmetic as transformers' LlamaRMSNorm (checked bit-equal), as one fused op in float32
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Module):
    """``y = x W^T + b`` with W stored for fast batch-1 decoding on CPU.

    Decode at batch 1 is a matrix-vector product per weight, bound by memory bandwidth. On CPU, MKL's
    gemv over a row-major (out, in) weight reads ~8-10 GB/s, against ~22 GB/s for a plain sum over
    the same bytes. Stored transposed, (in, out), and split along ``in`` into ``parts`` row blocks
    ``(parts, in/parts, out)``, one ``bmm`` lets each thread stream its own contiguous block into a
    partial sum; two threads then read 18-25 GB/s depending on the shape (measured on the 2-core CI
    machine kind). The layout is chosen at load time (``parts`` = intra-op threads); ``dense()`` gives
    back (out, in), and the same memory read as (in, out) is what the native kernels stream (m2r2.engine.native:
    one-row products run there when they are built, and whole blocks of decode-sized steps). Derived
    copies, built on demand and never saved: ``packed`` for 2..16 rows (see ``build_row_layout``) and
    ``lowp``, fp16 / int8 copies that ``mode`` selects (see ``build_lowp``; ``half``, the fp16 one for the
    native kernels).
    """

    GEMM_ROWS = 16  # above this many rows (prefill, training) the product is compute-bound: plain gemm
    FP16_SPLIT_MIN = 1 << 22  # weights this big (the LM head) run their fp16 product on every thread; splitting
    # smaller ones (gate_up, 1.8M) costs more in thread hand-offs than it gains (measured: 38 -> 33 tokens/s)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parts: int = 1):
        super().__init__()
        if parts < 1 or in_features % parts:
            raise ValueError(f"parts={parts} must divide in_features={in_features}")
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        # uninitialised (every constructor's caller loads weights next): untouched pages cost no memory, which a
        # model loaded as its GGUF blocks (no float32 weights at all) relies on
        self.weight = nn.Parameter(torch.empty(parts, in_features // parts, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # a second, derived copy for 2..GEMM_ROWS rows (speculative verification, riding rows, short
        # prefills): the weight prepacked by oneDNN; see ``build_row_layout``. A plain attribute, not a
        # buffer: an opaque oneDNN tensor has no storage to save, move or copy
        self.packed: torch.Tensor | None = None
        # reduced-precision copies by kind ("fp16", "int8"; see ``build_lowp``) and the one forward uses
        # (None: the float32 weight). Derived and opaque like ``packed``
        self.lowp: dict[str, torch.Tensor] = {}
        self.mode: str | None = None
        # the fp16 weight as a plain (in, out) half tensor, for the native kernels (m2r2.engine.native)
        self.half: torch.Tensor | None = None

    def __getstate__(self):  # copies and pickles drop the derived copies (rebuild with build_row_layout)
        self.float_weight()  # a layer loaded with only its GGUF blocks: the copy gets the float32 weight
        return {**self.__dict__, "packed": None, "lowp": {}, "mode": None, "half": None}

    def float_weight(self) -> torch.Tensor:
        """The float32 weight parameter (``weight``). A model loaded with only its GGUF blocks
        (``m2r2.load(weights="gguf")``) has none until something asks: then it is dequantised from the blocks, the
        exact float32 model's values (``m2r2.engine.blocks``), once per layer (training, the PyTorch path, a copy)."""
        w = self.weight
        if w.numel() == 0 and self.in_features and self.out_features:
            with _MATERIALIZE:
                if self.weight.numel() == 0:
                    self._materialize()
            w = self.weight
        return w

    def _materialize(self) -> None:
        bw = self.lowp.get("gguf")
        if bw is None:
            raise RuntimeError("this layer has neither float32 weights nor GGUF blocks")
        dense = bw.dense(self.in_features)
        with torch.no_grad():
            self.weight.data = self.pack(dense, self.parts)
        self.build_row_layout()

    @staticmethod
    def pack(dense: torch.Tensor, parts: int) -> torch.Tensor:
        """(out, in) -> (parts, in/parts, out): block p holds input features [p*in/parts, (p+1)*in/parts)."""
        out_f, in_f = dense.shape
        return dense.t().reshape(parts, in_f // parts, out_f).contiguous()

    def dense(self) -> torch.Tensor:
        """The weight as (out, in), like ``nn.Linear.weight``."""
        return self.float_weight().reshape(self.in_features, self.out_features).t()

    def build_row_layout(self) -> None:
        """Derive the copy used for 2..GEMM_ROWS rows (call again after changing the weight). A few rows
        against an ordinary weight is a skinny GEMM that MKL runs far below memory bandwidth (the LM head:
        17 ms for 5 rows against 3.3 ms for one). oneDNN's prepacked inner-product kernel streams the
        weight once for all rows. A full forward of the embedded model on 2 cores
        (``scripts/probe_decode_cost.py``), relative to one token: 2 / 3 / 5 / 9 tokens cost 1.31 / 1.37 /
        1.57 / 1.77x, against 1.53 / 1.69 / 1.60 / 1.87x with the out-chunked bmm layout used before and
        more with a plain GEMM. Only on CPU in float32 where oneDNN is built in; elsewhere, and whenever
        autograd needs the product, a plain GEMM runs."""
        w = self.weight.detach()
        if w.numel() == 0:  # only GGUF blocks so far (float_weight builds this with the float32 weight)
            self.packed = None
            return
        ok = w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.dense().detach().contiguous(), None) if ok else None

    def default_format(self) -> "weights.WeightFormat":
        """The format this layer runs when no ``weights.using`` block selects another (``mode``; None: fp32)."""
        mode = self.mode
        return FP32 if mode is None else FORMATS[mode]

    def build_lowp(self, kind: str) -> None:
        """Derive the ``kind`` ("fp16", "int8", ...: a name in ``m2r2.engine.weights.FORMATS``) copy of the
        weight from the float32 one (once)."""
        weights.get(kind).build(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        N = x2.shape[0]
        # the derived copies serve float32 products nothing differentiates (neither FBGEMM's nor oneDNN's op has
        # autograd): decode-sized ones in the selected format; longer ones (a prefill) in the float32 weights
        derived = nograd = x.dtype == torch.float32 \
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        if derived:
            # the format: the one this thread selected (``weights.using``), else this layer's default (``mode``);
            # a layer without a copy in the selected format (e.g. a drafter's own head) runs its float32 weights
            fmt = weights._ACTIVE.get()
            if fmt is None:
                fmt = self.default_format()
            elif fmt is not FP32 and fmt.name not in self.lowp:
                fmt = FP32
            derived = N <= self.GEMM_ROWS or fmt.any_rows
        if derived:
            if N == 1 and native.available() and self.weight.device.type == "cpu":
                # one C call streams the weight on every thread (float32, or the half copy in fp16)
                w = fmt.native_weight(self)
                if w is not None and w.dtype in native.KINDS:
                    return native.gemv(x2.contiguous(), w, self.bias, self.out_features).view(*lead, self.out_features)
            if fmt is not FP32:
                return fmt.product(self, x2).view(*lead, self.out_features)
        if nograd and N > 1 and self.packed is not None and self.weight.dtype == torch.float32 \
                and self.weight.device.type == "cpu":
            # oneDNN's inner product on the prepacked weight, for any number of rows: a few rows stream the weight
            # once; a prefill runs at ~95% of the multi-add rate on this AMD CPU, where PyTorch's default GEMM
            # (MKL) runs AVX2 code at ~40%. The copy is valid for a float32 weight on CPU (a model moved or cast
            # after loading falls back)
            return torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, "none", [None], "").view(
                *lead, self.out_features)
        w = self.float_weight()
        if N > 1 or self.parts == 1:  # one ordinary (threaded) gemm
            y = x2 @ w.view(self.in_features, self.out_features)  # (N, out)
        else:  # (P, 1, in/P) @ (P, in/P, out) -> P partial sums (P, 1, out) -> (1, out)
            xp = x2.view(-1, self.parts, self.in_features // self.parts).transpose(0, 1)
            y = torch.bmm(xp, w).sum(0)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def default_parts(in_features: int, threads: int | None = None) -> int:
    """The largest divisor of ``in_features`` not above the thread count (capped at 8)."""
    p = max(1, min(8, threads or torch.get_num_threads()))
    while in_features % p:
        p -= 1
    return p


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    """One pre-norm decoder layer: x + Attn(norm(x)), then x + MLP(norm(x))."""

    # the submodules the native block kernel computes, by type, and its linears (a block whose FFN runs elsewhere,
    # like the MoE block, names only its attention half's)
    _NATIVE_PARTS = (("input_norm", RMSNorm), ("qkv", Linear), ("o", Linear), ("post_norm", RMSNorm),
                     ("gate_up", Linear), ("down", Linear))
    _NATIVE_LINEARS = ("qkv", "o", "gate_up", "down")

    def __init__(self, cfg: ModelConfig, index: int, threads: int = 1):
        super().__init__()
        self.index = index
        self.cfg = cfg
        d = cfg.hidden_size

        def lin(i: int, o: int, bias: bool) -> Linear:
            return Linear(i, o, bias, default_parts(i, threads))

        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv = lin(d, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias)
        self.o = lin(cfg.q_size, d, cfg.attention_bias and cfg.model_type != "qwen2")
        self.post_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = lin(d, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down = lin(cfg.intermediate_size, d, cfg.mlp_bias)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def qkv_proj(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Project normalised states to rotated q (B,H,T,hd), k and v (B,KV,T,hd).

        RoPE is applied to q and k heads in one go; ``sin`` arrives sign-folded (see ``Transformer.rope``)
        so rotate_half(x) * sin == roll(x, hd/2) * sin_folded, bit for bit, in fewer ops."""
        B, T, _ = x.shape
        c = self.cfg
        qkv = self.qkv(x)
        qk = qkv[..., : c.q_size + c.kv_size].view(B, T, c.num_heads + c.num_kv_heads, c.head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd)
        qk = qk * cos + torch.roll(qk, c.head_dim // 2, dims=-1) * sin
        q = qk[:, :, : c.num_heads].transpose(1, 2)
        k = qk[:, :, c.num_heads:].transpose(1, 2)
        v = qkv[..., c.q_size + c.kv_size:].view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k_all, v_all, mask) -> torch.Tensor:
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, scale=self.scale,
            enable_gqa=self.cfg.num_heads != self.cfg.num_kv_heads)
        return self.o(out.transpose(1, 2).reshape(B, T, self.cfg.q_size))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)

    def write_kv(self, x: torch.Tensor, ctx: "StepContext") -> None:
        """Write the K/V this block computes from states x into the cache, without attending or the MLP
        (a token that skips the block still leaves later tokens something to attend to)."""
        _, k, v = self.qkv_proj(self.input_norm(x), ctx.cos, ctx.sin)
        ctx.cache.update(self.index, k, v, ctx.write)

    def _native_format(self, x: torch.Tensor, ctx: "StepContext"):
        """The weight format the native block kernel computes this call from, or None where it does not compute
        it exactly (see m2r2.engine.native): not when a submodule was replaced (e.g. by a LoRA-wrapped linear),
        when hooks expect the submodules to be called, or for a format whose weights it cannot read."""
        mods = self._modules  # (direct dict reads: this runs for every block of every step)
        if not ctx.native or any(type(mods[n]) is not t for n, t in self._NATIVE_PARTS):
            return None
        qkv = mods["qkv"]
        w = qkv._parameters["weight"]
        fmt = ctx.weights or qkv.default_format()
        # (the mask check: a mask replaced after the context was built, rather than passed to it, is honoured too)
        ok = ctx.write.mask is ctx.causal_mask and w.dtype == torch.float32 and fmt.native_block_ready(self) \
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) \
            and not any(m._forward_hooks or m._forward_pre_hooks for m in mods.values())
        return fmt if ok else None

    def forward(self, x: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        # a decode-sized step: the whole block is one C call (not for blocks that borrow this forward,
        # like the MoE blocks with their own FFN or q/k norms: they compute something the kernel does not)
        fmt = self._native_format(x, ctx) if type(self) is Block else None
        if fmt is not None:
            return native.block(self, x, ctx.cache.k[self.index], ctx.cache.v[self.index], ctx.cos, ctx.sin,
                                ctx.native_rows, fmt)
        q, k, v = self.qkv_proj(self.input_norm(x), ctx.cos, ctx.sin)
        k_all, v_all = ctx.cache.update(self.index, k, v, ctx.write)
        x = x + self.attend(q, k_all, v_all, ctx.write.mask)
        return x + self.mlp(x)


class StepContext:
    """Everything the layers of one forward call share, fixed when it is built: the cache slots written
    (``positions``), the RoPE rows (of ``rope_positions``, default the slots), the attention mask (the cache's
    causal rule, or ``mask`` (B, 1, T, S) with S = max(positions) + 1 for strategies whose rows see other
    keys: Lookahead's window, early exit's riding rows; or ``tree``, a draft tree's slots, RoPE positions and mask in
    one, which the native kernels also compute), the weight format selected in this thread
    (``weights``: None, each layer's default; see ``m2r2.engine.weights.using``), and whether the blocks may
    run as native kernels (on CPU under the causal rule: a decode-sized float32 step, or a step of any length
    in a format whose kernels take any number of rows, the GGUF blocks)."""

    def __init__(self, model: "Transformer", cache: KVCache, positions: torch.Tensor,
                 rope_positions: torch.Tensor | None = None, mask: torch.Tensor | None = None, prompt: bool = False,
                 tree: TreeMask | None = None):
        if tree is not None:  # a draft tree: its slots, its depths' RoPE rows, its mask (which the kernels take too)
            if mask is not None or rope_positions is not None:
                raise ValueError("a draft tree brings its own mask and RoPE positions")
            positions, rope_positions = tree.slots, tree.rope_positions
            mask = tree.visible(int(positions.max()) + 1)
        self.cache = cache
        self.positions = positions
        self.write = WriteSpec(positions, cache.max_len)
        if mask is not None:
            self.write.mask = mask
        self.cos, self.sin = model.rope(positions if rope_positions is None else rope_positions)
        self.weights = weights.active()
        fmt = self.weights or model.lm_head.default_format()
        rows_ok = positions.numel() <= Linear.GEMM_ROWS or positions.numel() < fmt.native_max_rows
        # a prompt (``prompt``: a prefill, never a decode step or a verification, whose rows must not depend on each
        # other) of many tokens per sequence in a format with its own prefill products: layer by layer under
        # ``fmt.prefill()`` (Transformer.hidden) instead of the native decode-step kernels
        self.prefill = fmt if prompt and mask is None and fmt.prefill_rows \
            and positions.shape[-1] >= fmt.prefill_rows else None
        self.native = (mask is None or tree is not None) and rows_ok and self.prefill is None \
            and type(cache) is KVCache and cache.k[0].dtype == torch.float32 and cache.k[0].device.type == "cpu" \
            and native.available()
        # the mask the native kernels compute: the cache's causal rule, or a draft tree's
        self.causal_mask = self.write.mask if mask is None or tree is not None else None
        self.native_rows = native.rows_of(positions, tree) if self.native else None


class Transformer(nn.Module):
    """A decoder as a seam of parts; the decode loop and every strategy drive it layer by layer."""

    def __init__(self, cfg: ModelConfig, rope_table: tuple[torch.Tensor, torch.Tensor], threads: int | None = None):
        super().__init__()
        self.cfg = cfg
        threads = threads or torch.get_num_threads()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, threads) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # with tied embeddings the head is a packed copy of the embedding (load_dense keeps them equal):
        # the gather wants rows, the matvec wants the packed layout
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, default_parts(cfg.hidden_size, threads))
        cos, sin = rope_table  # (max_positions, hd), float32
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        half = cos.shape[-1] // 2  # rotate_half(x)*sin == roll(x, half)*[-sin_lo, sin_hi], exactly
        self.register_buffer("rope_sin_folded", torch.cat((-sin[:, :half], sin[:, half:]), -1), persistent=False)

    def load_dense(self, sd: dict[str, torch.Tensor], linear_weights: bool = True) -> None:
        """Load a state dict with ordinary (out, in) linear weights (as ``hf_state_dict_to_m2r2`` makes
        them), packing each into its ``Linear``'s layout. Raises KeyError / ValueError on a mismatch.
        ``linear_weights=False``: ``sd`` has none (a GGUF loaded as its blocks); every linear layer's weight stays
        empty until ``Linear.float_weight`` dequantises it from the blocks attached after this."""
        sd = dict(sd)
        linears = {name: mod for name, mod in self.named_modules() if isinstance(mod, Linear)}
        packed = {}
        if linear_weights and self.cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        if not linear_weights:
            for name, mod in linears.items():
                mod.weight = nn.Parameter(torch.empty(0), requires_grad=False)
                packed[name + ".weight"] = mod.weight
        for key, t in sd.items():
            owner, _, leaf = key.rpartition(".")
            mod = linears.get(owner)
            if mod is not None and leaf == "weight":
                if tuple(t.shape) != (mod.out_features, mod.in_features):
                    raise ValueError(f"{key}: shape {tuple(t.shape)}, expected {(mod.out_features, mod.in_features)}")
                t = Linear.pack(t, mod.parts)
            packed[key] = t
        missing, unexpected = self.load_state_dict(packed, strict=False)
        if missing or unexpected:
            raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for mod in linears.values():
            mod.build_row_layout()

    @contextlib.contextmanager
    def use_weights(self, kind: str):
        """Run every linear layer (blocks and LM head) from the ``kind`` copy of its weight inside the block
        ("fp32": the exact float32 weights; "fp16"/"int8": see ``m2r2.engine.weights``), built on first use.
        Scoped to this thread: the model itself is not changed, so another thread decoding on it keeps its own
        format."""
        self.build_weights(kind)
        with weights.using(kind):
            yield self

    def _linears(self) -> list[Linear]:
        # switched on every draft call: the module walk is done once (the layers are fixed at construction)
        linears = self.__dict__.get("_linear_list")
        if linears is None:
            linears = self.__dict__["_linear_list"] = [m for m in self.modules() if isinstance(m, Linear)]
        return linears

    def build_weights(self, kind: str) -> None:
        """Build every linear layer's ``kind`` copy now, at the load boundary (``use_weights`` would on first
        use). Once per kind; two threads asking at once build it once."""
        fmt = weights.get(kind)
        linears = self._linears()
        if fmt.built(linears[-1]):  # copies are built in module order: the last one has it iff all do
            return
        with _BUILD_LOCK:
            for m in linears:
                fmt.build(m)

    def set_weights(self, kind: str) -> str:
        """Make ``kind`` every linear layer's default format (what runs when no ``use_weights`` block selects
        another): a load-time setting (``m2r2.load(weights=...)``), not for switching while decoding. Returns
        the previous default."""
        self.build_weights(kind)
        linears = self._linears()
        prev = linears[0].mode or "fp32"
        mode = None if kind == "fp32" else kind
        for m in linears:
            m.mode = mode
        return prev

    @property
    def weights(self) -> str:
        """The format the linear layers run from here: this thread's ``use_weights`` selection, else the default."""
        fmt = weights.active()
        return fmt.name if fmt is not None else self.lm_head.mode or "fp32"

    # ---- the seam ----
    def rope(self, positions: torch.Tensor):
        if int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError("position beyond the model's context window")
        dtype = self.rope_dtype()
        return self.rope_cos[positions].to(dtype), self.rope_sin_folded[positions].to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        blocks = self.__dict__.get("_embed_blocks")
        if blocks is not None and self.embed_tokens.weight.numel() == 0:  # rows dequantised from the GGUF
            from .blocks import dequantize_rows
            fmt, raw = blocks
            rows = dequantize_rows(raw, fmt, ids.reshape(-1).numpy())
            return torch.from_numpy(rows).view(*ids.shape, self.cfg.hidden_size)
        return self.embed_tokens(ids)

    def set_embedding_blocks(self, fmt: str, raw) -> None:
        """Embed tokens from the GGUF's own rows (``fmt`` blocks, ``raw`` (vocab, bytes per row) uint8): each lookup
        dequantises only its rows (the float32 embedding's values exactly, ``blocks.dequantize_rows``), so the
        embedding costs the file's bytes, not 4 per weight; ``embedding_weight()`` builds the float32 table if
        something needs it whole."""
        self.embed_tokens.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.__dict__["_embed_blocks"] = (fmt, raw)

    def materialize(self, layers=None) -> None:
        """Give the float32 weights to the linear layers of ``layers`` (indices; default all), the LM head and the
        embedding, where the model runs from GGUF blocks and has none yet (a no-op otherwise): for code that
        reads the weights themselves (``state_dict``, copies)."""
        chosen = range(len(self.layers)) if layers is None else layers
        for i in chosen:
            for mod in self.layers[i].modules():
                if isinstance(mod, Linear):
                    mod.float_weight()
        self.lm_head.float_weight()
        self.embedding_weight()

    def embedding_weight(self) -> torch.Tensor:
        """The embedding table (vocab, hidden) as float32 weights (dequantised from the GGUF once if the model
        embeds from its blocks)."""
        w = self.embed_tokens.weight
        blocks = self.__dict__.get("_embed_blocks")
        if blocks is not None and w.numel() == 0:
            from .blocks import dequantize
            with _MATERIALIZE:
                if self.embed_tokens.weight.numel() == 0:
                    full = torch.from_numpy(dequantize(blocks[1], blocks[0]))
                    self.embed_tokens.weight = nn.Parameter(full, requires_grad=False)
            w = self.embed_tokens.weight
        return w

    def layer(self, i: int, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        ctx.cache.counters.layer_calls += x.shape[0] * x.shape[1]
        return self.layers[i].forward(x, ctx)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden states -> float32 logits."""
        return self.lm_head(self.norm(x)).float()

    def context(self, cache: KVCache, positions: torch.Tensor, rope_positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, prompt: bool = False, tree: TreeMask | None = None) -> StepContext:
        return StepContext(self, cache, positions, rope_positions, mask, prompt, tree)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        dtype = self.rope_dtype()
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype=dtype,
                       device=self.embed_tokens.weight.device)

    def rope_dtype(self) -> torch.dtype:
        w = self.embed_tokens.weight
        return w.dtype if w.is_floating_point() else torch.float32

    def forward(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                last_only: bool = False, tree: TreeMask | None = None) -> torch.Tensor:
        """Full-depth forward of ids (B, T) at ``positions`` (B, T); returns logits (B, T, V)
        (or (B, 1, V) of the last position when ``last_only``). Writes K/V; does not commit lengths. ``tree``: the
        T tokens are a draft tree's nodes (its slots and positions replace ``positions``; see ``TreeMask``)."""
        x = self.hidden(ids, cache, positions, tree=tree)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def hidden(self, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor, prompt: bool = False,
               tree: TreeMask | None = None) -> torch.Tensor:
        """The full-depth forward of ``forward`` up to the final states (B, T, D), before norm and head. ``prompt``: a
        prefill (its rows may be computed together in any order: see ``StepContext``); ``tree``: a draft tree."""
        ctx = self.context(cache, positions, prompt=prompt, tree=tree)
        x = self.embed(ids)
        fmt = self._native_stack(x, ctx)
        if fmt is not None:  # every block native in one format: the whole stack in one C call
            x = native.blocks(self, x, ctx.cache, ctx.cos, ctx.sin, ctx.native_rows, fmt)
            cache.counters.layer_calls += x.shape[0] * x.shape[1] * len(self.layers)
        else:
            with ctx.prefill.prefill() if ctx.prefill is not None else contextlib.nullcontext():
                for i in range(self.cfg.num_layers):
                    x = self.layer(i, x, ctx)
        cache.counters.forward_passes += 1
        return x

    def _native_stack(self, x: torch.Tensor, ctx: StepContext, n: int | None = None):
        """The one weight format in which every block (or the first ``n``) would run its native kernel this step
        (each block's own checks, ``Block._native_format``), or None; also None when ``layer`` is replaced on this
        model."""
        if not ctx.native or "layer" in self.__dict__:
            return None
        fmt = None
        for blk in self.layers[:n]:
            f = blk._native_format(x, ctx) if type(blk) is Block else None
            if f is None or (fmt is not None and f is not fmt):
                return None
            fmt = f
        return fmt


def hf_state_dict_to_m2r2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face Llama-family state dict onto m2r2's fused blocks (done once, at load)."""

    def get(name: str) -> torch.Tensor:
        for key in (name, "model." + name):
            if key in sd:
                return sd[key]
        raise KeyError(name)

    out: dict[str, torch.Tensor] = {"embed_tokens.weight": get("embed_tokens.weight"),
                                    "norm.weight": get("norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        out[p + "input_norm.weight"] = get(p + "input_layernorm.weight")
        out[p + "post_norm.weight"] = get(p + "post_attention_layernorm.weight")
        out[p + "qkv.weight"] = torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"),
                                           get(a + "v_proj.weight")], 0)
        out[p + "o.weight"] = get(a + "o_proj.weight")
        m = p + "mlp."
        out[p + "gate_up.weight"] = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")], 0)
        out[p + "down.weight"] = get(m + "down_proj.weight")
        if cfg.attention_bias:
            out[p + "qkv.bias"] = torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"),
                                             get(a + "v_proj.bias")], 0)
        if cfg.attention_bias and cfg.model_type != "qwen2":
            out[p + "o.bias"] = get(a + "o_proj.bias")
        if cfg.mlp_bias:
            out[p + "gate_up.bias"] = torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")], 0)
            out[p + "down.bias"] = get(m + "down_proj.bias")
    return out
