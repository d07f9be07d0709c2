"""The exceptions the CLI turns into one line: bad user input (exit 2) and a run stopped by a signal."""


class UserError(ValueError):
    """Bad input that the user can fix: unknown name, wrong shape, missing path, corrupt checkpoint."""


class Interrupted(Exception):
    """A run stopped by a signal after saving its work; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
