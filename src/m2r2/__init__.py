"""m2r2: Mixture of Multi-Rate Residuals. Faster generation from a pretrained LM, same output.

The public names that need torch load on first use (PEP 562), so ``import m2r2.cli`` stays light and a
Ctrl-C while torch loads reaches the command line's handler (one line, no traceback)."""

from .engine.threads import configure_openmp as _configure_openmp

_configure_openmp()  # before anything imports torch (and so loads libgomp)

from .errors import (AdapterError, ContextLengthError, M2R2Error, ModelNotFoundError, OptionError, PromptError,
                     PromptFileError, SamplingError, StrategyError, UnsupportedModelError, WeightFormatError)

__version__ = "0.1.0"
__all__ = ["load", "LM", "GenerationOutput", "GenerationStats", "SamplingConfig", "decode", "Strategy",
           "register_strategy", "Options", "option", "M2R2Error", "ModelNotFoundError", "UnsupportedModelError",
           "ContextLengthError", "OptionError", "SamplingError", "StrategyError", "WeightFormatError", "PromptError",
           "PromptFileError", "AdapterError"]
_LAZY = {"load": "api", "LM": "api", "GenerationOutput": "api", "GenerationStats": "decoding.state",
         "decode": "decoding.loop", "Strategy": "decoding.state", "register_strategy": "decoding.registry",
         "Options": "decoding.registry", "option": "decoding.registry", "SamplingConfig": "engine.sampling"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
