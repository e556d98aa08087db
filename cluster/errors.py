"""Typed errors a person can act on: what failed, where, and what to do next."""

from __future__ import annotations


class LlamaclusterError(Exception):
    """Base of every error the CLI turns into one line and a non-zero exit code.

    ``hint`` says what to run or change next; ``exit_code`` tells scripts which kind of failure it
    was (see the table in the README).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the hint joined into the single line the CLI prints."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(LlamaclusterError):
    """Bad input from the user: a flag, a file, an inventory line, a config value."""

    exit_code = 3


class RemoteError(LlamaclusterError):
    """A command failed on one or more nodes."""

    exit_code = 4


class NotReadyError(LlamaclusterError):
    """Something did not come up in time (a node, the Ray cluster, the server)."""

    exit_code = 5


class DownloadError(LlamaclusterError):
    """The model could not be fetched or verified."""

    exit_code = 6
