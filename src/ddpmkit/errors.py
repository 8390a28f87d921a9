"""The exceptions that end a run with one line: a mistake in the input (exit 2) or a stop signal (exit 128 + signal)."""


class UserError(Exception):
    """A mistake in the user's input (path, flag value, data, model folder), with what to do about it."""

    exit_code = 2


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
