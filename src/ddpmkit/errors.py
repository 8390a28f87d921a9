"""The exceptions that end a run with one line: a mistake in the input (exit 2) or a stop signal (exit 128 + signal),
and `first_line`, what such a line quotes of another library's error."""


class UserError(Exception):
    """A mistake in the user's input (path, flag value, data, model folder), with what to do about it."""

    exit_code = 2


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name when it has none): what a one-line
    UserError quotes of an error raised by another library."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
