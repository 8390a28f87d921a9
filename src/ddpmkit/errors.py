"""The one exception a user can cause: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A mistake in the user's input (path, flag value, data, model folder), with what to do about it."""

    exit_code = 2
