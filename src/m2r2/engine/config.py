"""The one representation of a model's shape that the core sees.

Checkpoints arrive in Hugging Face form (a ``config.json`` or a GGUF converted by transformers);
``ModelConfig.from_hf`` converts at that boundary and rejects what the engine cannot run, naming the
field at fault. Behaviour is chosen from explicit fields here, never from a model's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModelError

# Decoder families whose checkpoints map onto m2r2's block: pre-norm RMSNorm, rotary attention with
# grouped K/V heads, gated-SiLU MLP. Qwen2 differs only by q/k/v biases (``attention_bias``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- cost model: the model knows what a token costs, so benchmarks can print the ceiling ----
    def layer_params(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        mlp = 3 * d * f
        return attn + mlp + 2 * d

    def head_params(self) -> int:
        return self.vocab_size * self.hidden_size + self.hidden_size

    def weight_bytes_per_token(self, bytes_per_param: float = 4.0, layers: int | None = None) -> float:
        """Bytes of weights a batch-1 decode step reads: every layer's weights plus the LM head
        (the embedding row gather is negligible)."""
        n = self.num_layers if layers is None else layers
        return bytes_per_param * (n * self.layer_params() + self.head_params())

    def flops_per_token(self, context: int = 0, layers: int | None = None) -> float:
        """Multiply-adds x 2 of one token through ``layers`` layers and the head at a given context."""
        n = self.num_layers if layers is None else layers
        attn = 2 * 2 * self.num_heads * self.head_dim * context
        return 2.0 * (n * self.layer_params() + self.head_params()) + n * attn

    @classmethod
    def from_hf(cls, hf_config, eos_token_ids: tuple[int, ...] | None = None) -> "ModelConfig":
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type={model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only 'silu')")
        rope = getattr(hf_config, "rope_parameters", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", "llama3", "linear"):
            # dynamic/yarn variants change with length; the precomputed table would be wrong.
            raise UnsupportedModelError(f"rope_type={rope.get('rope_type')!r} is not supported")
        if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True) \
                and model_type == "mistral":
            raise UnsupportedModelError("sliding-window attention is not supported")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if eos_token_ids is None:
            eos = hf_config.eos_token_id
            eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", model_type == "qwen2")),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            model_type=model_type,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=tuple(int(e) for e in eos_token_ids),
            pad_token_id=getattr(hf_config, "pad_token_id", None),
        )
