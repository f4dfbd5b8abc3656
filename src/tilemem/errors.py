"""Errors a user can act on. Each message says what was wrong, where, and what to do."""


class TileMemError(Exception):
    """Base class of every error TileMEM raises for bad input."""


class ConfigError(TileMemError):
    """A config file or field is missing, malformed or unsupported."""


class BudgetError(ConfigError):
    """A byte size or tier budget is malformed, or too small for what must live in it."""


class UnsupportedArchitectureError(ConfigError):
    """The checkpoint's architecture has no registered family."""


class CheckpointError(TileMemError):
    """A checkpoint directory or weight file is missing, truncated, corrupt or mismatched."""


class WeightError(CheckpointError):
    """A tensor is missing, unexpected or mis-shaped."""


class RequestError(TileMemError):
    """A generation request is invalid (bad sampling parameters, prompt too long, ...)."""


class OutputExistsError(TileMemError):
    """An output path already holds something TileMEM did not write; it refuses to replace it."""


class GenerationError(TileMemError, RuntimeError):
    """A forward pass failed while generating (e.g. a corrupt tile was read); the message says what to do."""


class KernelError(TileMemError):
    """The native CPU kernels cannot run as built (see `tilemem.kernels`)."""


class KernelABIError(KernelError):
    """The loaded kernel library's interface version or struct sizes differ from what Python expects."""


class KernelMemoryError(KernelError, MemoryError):
    """A native kernel could not allocate its working memory."""


class RankError(TileMemError):
    """A rank of a distributed run died, hung past the timeout, or disagrees with the others; the run stops."""


class X12Overflow(ValueError):
    """A bf16 tile has more weights than an x12 payload's exception capacity (`layers.x12`): it is stored as
    bf16 instead. Internal (a store falls back and says so), not a user error."""
