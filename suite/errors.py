"""User-facing errors: each names the input, the problem and the fix."""


class ExitbenchError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class UnknownNameError(ExitbenchError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(ExitbenchError):
    """A suite config that does not validate."""


class DataError(ExitbenchError):
    """A data source that is missing, empty or lacks a field."""


class MeasureFailedError(ExitbenchError):
    """A measure that raised, returned the wrong shape, NaN or +inf on real traces, or broke
    a sandbox limit. The failure is the measure's alone: the other measures of its group
    finish, and the failure is stored with the key its rows would have (``deterministic``),
    so a rerun does not retry it until its inputs change."""

    def __init__(self, message: str, *, deterministic: bool = True):
        super().__init__(message)
        self.deterministic = deterministic
