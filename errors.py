"""The one exception type for bad user input; the CLI prints it as a single line and exits non-zero."""


class UserError(ValueError):
    """Bad input that the user can fix: unknown name, wrong shape, missing path, corrupt checkpoint."""
