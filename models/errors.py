"""Errors of the ML core. Each message says what is wrong and how to fix it."""


class MigrationError(ValueError):
    """Base class: bad input to the ML core (the service maps it to a 4xx)."""


class AssetError(MigrationError):
    """A bundled model or dataset is missing or does not match its pinned hash."""


class UnknownModelError(MigrationError):
    """A model name that is neither registered nor a checkpoint directory."""


class CheckpointError(MigrationError):
    """A checkpoint directory that cannot be loaded (no config, no weights)."""


class ShapeMismatchError(MigrationError):
    """A prompt tensor whose width or length does not fit the model or adapter."""


class InvalidPromptError(MigrationError):
    """A prompt tensor with NaN or Inf values."""


class DataError(MigrationError):
    """Empty data, unknown users, malformed records."""


class BudgetError(MigrationError):
    """A selection budget outside 1..population."""


class Cancelled(Exception):
    """Raised between steps when the caller asked to stop."""
