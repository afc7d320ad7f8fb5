"""Errors the command line reports as one line (no traceback unless --debug)."""


class TrainingAborted(RuntimeError):
    """Training stopped because a role kept producing non-finite losses or gradients."""
