"""m2r2: Mixture of Multi-Rate Residuals. Faster generation from a pretrained LM, same output."""

from .threads import configure_openmp as _configure_openmp

_configure_openmp()  # before anything below imports torch (and so loads libgomp)

from .api import LM, GenerationOutput, load
from .errors import (AdapterError, ContextLengthError, M2R2Error, ModelNotFoundError, PromptFileError,
                     SamplingError, UnsupportedModelError)
from .generate import GenerationStats, decode, register_strategy
from .sampling import SamplingConfig

__version__ = "0.1.0"
__all__ = ["load", "LM", "GenerationOutput", "GenerationStats", "SamplingConfig", "decode",
           "register_strategy", "M2R2Error", "ModelNotFoundError", "UnsupportedModelError",
           "ContextLengthError", "SamplingError", "PromptFileError", "AdapterError"]
