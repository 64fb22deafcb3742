"""Exceptions that reach the operator; each message says what failed and what to do."""


class ModelLoadError(RuntimeError):
    """Raised when a base model or adapter cannot be loaded."""
