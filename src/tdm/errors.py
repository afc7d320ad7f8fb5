"""The one error family the command line reports as a single line (no traceback unless --debug)."""


class TDMError(Exception):
    """A problem with the user's input or environment, described in one line naming the field or file."""


class TrainingAborted(TDMError, RuntimeError):
    """Training stopped because a role kept producing non-finite losses or gradients."""


class MissingExtra(TDMError, ImportError):
    """An optional dependency group (e.g. the [diffusers] extra) is not installed; the message says which."""
