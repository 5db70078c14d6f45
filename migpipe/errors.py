"""The project's single error type.

Every failure a user can cause (bad input, a truncated stream, a wrong option) is raised as
MigpipeError, so the CLI can print one line and exit non-zero instead of a traceback.
"""


class MigpipeError(Exception):
    """A failure explained for the user, with the stream offset where it was found, if any."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message, offset)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"{self.message} (at byte offset {self.offset})"
