"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake in what the user gave us (path, file, option). Never a bug in medivae."""
