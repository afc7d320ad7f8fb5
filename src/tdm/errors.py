"""The one error family the command line reports as a single line (no traceback unless --debug)."""


class TDMError(Exception):
    """A problem with the user's input or environment, described in one line naming the field or file."""


class ConfigError(TDMError, ValueError):
    """A bad configuration value, file or key; the message names it."""


class TrainingAborted(TDMError, RuntimeError):
    """Training stopped because a role kept producing non-finite losses or gradients."""


class MissingPackage(TDMError, ImportError):
    """An optional package (the [diffusers] extra, a metric or prompt-format package) is not installed; the message
    says what needs it and what to install (`tdm.optional.require`)."""


class MissingModel(TDMError, FileNotFoundError):
    """A metric network that is not on this machine; the message says where tdm looked and how to get it."""
