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


class NodeFailure:
    """What failed on one node: the structured fields behind a NodesFailedError."""

    __slots__ = ("command", "connection_failed", "node", "returncode", "stderr_tail", "timed_out")

    def __init__(
        self,
        node: str,
        *,
        command: str,
        returncode: int,
        stderr_tail: str,
        timed_out: bool = False,
        connection_failed: bool = False,
    ) -> None:
        self.node = node
        self.command = command
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out
        self.connection_failed = connection_failed

    def describe(self) -> str:
        """``node (exit N[, timed out | could not connect]): last stderr lines`` on one line."""
        what = f"exit {self.returncode}"
        if self.timed_out:
            what += ", timed out"
        elif self.connection_failed:
            what += ", could not connect"
        tail = " | ".join(line for line in self.stderr_tail.splitlines() if line.strip())
        return f"{self.node} ({what})" + (f": {tail}" if tail else "")

    def __repr__(self) -> str:
        return f"NodeFailure({self.describe()!r})"


class NodesFailedError(RemoteError):
    """A command failed on one or more nodes; ``failures`` lists every one of them, in order."""

    def __init__(
        self,
        failures: list[NodeFailure],
        *,
        total: int,
        what: str = "command",
        hint: str | None = None,
    ) -> None:
        self.failures = list(failures)
        self.total = total
        listing = "; ".join(f.describe() for f in self.failures)
        super().__init__(
            f"{what} failed on {len(self.failures)} of {total} node(s): {listing}",
            hint=hint or "fix the node(s) named above and run again (-v shows the commands)",
        )

    @property
    def nodes(self) -> list[str]:
        """Labels of the failed nodes, in inventory order."""
        return [f.node for f in self.failures]


def flag_of(model: type, field: str) -> str:
    """The command-line flag of a config model's field: its ``flag`` metadata, else ``--field``."""
    info = getattr(model, "model_fields", {}).get(field)
    extra = getattr(info, "json_schema_extra", None) if info is not None else None
    if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
        return extra["flag"]
    return "--" + field.replace("_", "-")


def validation_error(exc: Exception, model: type, *, what: str = "") -> ConfigError:
    """One ConfigError line from a pydantic ValidationError, naming the flag a person typed.

    ``model`` is the config class the error came from (its fields carry their flag names);
    ``what`` prefixes the line (``bad serve config: ``). Every problem is listed, ``;``-joined.
    """
    errors = exc.errors() if callable(getattr(exc, "errors", None)) else []
    if not errors:
        return ConfigError(f"{what}{exc}")
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        name = _flag_at(model, loc)
        parts.append(f"{name}: {msg}" if name else msg)
    return ConfigError(what + "; ".join(parts))


def _flag_at(model: type, loc: list[str]) -> str | None:
    """The flag of the deepest field along ``loc`` (nested config models are walked)."""
    flag, cls = None, model
    for part in loc:
        fields = getattr(cls, "model_fields", {})
        if part not in fields:
            if flag is None:  # a field the model does not have (extra input)
                return "--" + str(part).replace("_", "-")
            continue  # a list index or a dict key under the field
        flag = flag_of(cls, part)
        annotation = fields[part].annotation
        cls = annotation if isinstance(annotation, type) else None
    return flag
