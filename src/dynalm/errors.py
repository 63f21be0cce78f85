"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad config key, a missing file, a
reward function that returns the wrong thing). The CLI prints it as one line,
`dynalm: error: <what> (<how to fix>)`, and exits with code 2 — never a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, with a hint on how to fix it."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.what} ({self.fix})" if self.fix else self.what
