"""Typed errors. Every user mistake raises an ``M2R2Error`` subclass whose message says what to do;
the CLI prints it on one line and exits non-zero instead of showing a traceback."""


class M2R2Error(Exception):
    """Base class of every error m2r2 raises for bad input."""


class ModelNotFoundError(M2R2Error):
    """The model (embedded package, directory, file or hub id) cannot be found."""


class UnsupportedModelError(M2R2Error):
    """The model exists but is not an architecture m2r2 can run, or its files are corrupt."""


class ContextLengthError(M2R2Error):
    """A prompt does not fit in the model's context window."""


class OptionError(M2R2Error, ValueError):
    """An option or argument has a value m2r2 cannot use (a dtype, a thread count, a budget, ...)."""


class SamplingError(OptionError):
    """Invalid sampling settings (temperature, top-k, top-p, seed) or generation budget."""


class StrategyError(OptionError):
    """An unknown decoding strategy, an option it does not take or cannot use, or a strategy that cannot run
    on this input (e.g. a batch-1 method given a batch)."""


class WeightFormatError(OptionError):
    """An unknown weight format, or one this machine or PyTorch build cannot run."""


class PromptError(M2R2Error, ValueError):
    """A prompt that cannot be generated from: empty, not text or token ids, ids outside the vocabulary."""


class PromptFileError(M2R2Error):
    """A prompt file is missing, empty or has no usable prompt field."""


class AdapterError(M2R2Error):
    """An adapter file is missing, corrupt, or was trained for a different base model."""
