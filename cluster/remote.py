"""Programs that run on a node with the shared env's python, and how the controller calls them.

The contract (docs/CLUSTER.md, "Remote programs"): ``<python> -m <module> <verb>`` reads one JSON
request, the verb's pydantic model, on stdin. It prints exactly one JSON object as the last line
of stdout: ``{"ok": true, ...}`` with exit 0, or ``{"ok": false, "error": ...}`` with a non-zero
exit, and then the reason is also the last line of stderr (one line; a project error's hint
rides in the reply as ``hint``). A bad request (not JSON,
a missing, unknown or invalid field, an unknown verb) exits 2; a verb that fails exits 1.

Program side: ``main(verbs, prog=...)`` with one ``Verb`` (request model, handler) per verb.
Controller side: ``RemoteCall`` (the command, the request as stdin, a plan line) and ``Reply``.
Only the standard library and pydantic are imported here: the program side runs in the shared
env before anything heavy (Ray, vLLM) is needed.
"""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.errors import LlamaclusterError, RemoteError

if TYPE_CHECKING:
    from cluster.runner import Result

BAD_REQUEST = 2
"""Exit code of a request that does not parse or validate (or an unknown verb)."""
FAILED = 1
"""Exit code of a verb that ran and failed."""


class Request(BaseModel):
    """Base of every verb's request: unknown fields are an error, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class VerbFailed(Exception):
    """A verb's expected failure: ``message`` becomes the one stderr line, ``fields`` join
    ``{"ok": false, "error": message}`` on stdout."""

    def __init__(self, message: str, *, exit_code: int = FAILED, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.fields = fields


@dataclass(frozen=True)
class Verb:
    """One verb of a remote program: its request model and the handler that answers it (the
    handler's mapping joins ``"ok": true`` in the reply)."""

    request: type[Request]
    handler: Callable[[Any], Mapping[str, Any]]


# ---------------------------------------------------------------------------- program side


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(message).split())


def _emit(reply: Mapping[str, Any], out: IO[str]) -> None:
    out.write(json.dumps(reply) + "\n")
    out.flush()


def _fail(message: str, code: int, out: IO[str], err: IO[str], **fields: Any) -> int:
    message = one_line(message)
    _emit({"ok": False, "error": message, **fields}, out)
    err.write(message + "\n")
    err.flush()
    return code


def validation_message(exc: ValidationError) -> str:
    """Every problem of a pydantic error on one line: ``field: problem; ...``."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or str(exc)


def main(
    verbs: Mapping[str, Verb],
    *,
    prog: str,
    argv: Sequence[str] | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the verb named by ``argv`` (default ``sys.argv[1:]``) on the request read from stdin;
    return the exit code (see the module's docstring for the contract)."""
    args = sys.argv[1:] if argv is None else list(argv)
    inp, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if len(args) != 1 or args[0] not in verbs:
        usage = f"usage: python -m {prog} {'|'.join(verbs)} (one JSON request on stdin)"
        return _fail(usage, BAD_REQUEST, out, err)
    name, verb = args[0], verbs[args[0]]
    raw = inp.read()
    if not raw.strip():
        return _fail(f"bad {name} request: no JSON on stdin", BAD_REQUEST, out, err)
    try:
        request = verb.request.model_validate_json(raw)
    except ValidationError as exc:
        return _fail(f"bad {name} request: {validation_message(exc)}", BAD_REQUEST, out, err)
    try:
        fields = dict(verb.handler(request))
    except VerbFailed as exc:
        return _fail(exc.message, exc.exit_code, out, err, **exc.fields)
    except LlamaclusterError as exc:  # the message is the line; the hint rides in the reply
        hint = {"hint": exc.hint} if exc.hint else {}
        return _fail(exc.message, FAILED, out, err, **hint)
    except Exception as exc:  # a bug or an unexpected failure: keep its traceback before it
        traceback.print_exc(file=err)
        return _fail(f"{type(exc).__name__}: {exc}", FAILED, out, err)
    _emit({"ok": True, **fields}, out)
    return 0


# ------------------------------------------------------------------------- controller side


def parse_reply(stdout: str) -> dict[str, Any] | None:
    """The reply on the last non-empty line of ``stdout``, or None when it is not a JSON
    object (the program did not get that far)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        reply = json.loads(lines[-1])
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


@dataclass(frozen=True)
class Reply:
    """What a remote program answered: the command's Result and its parsed reply (if any)."""

    result: Result
    data: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        """True when the program exited 0 and replied ``"ok": true``."""
        return self.result.ok and self.data is not None and self.data.get("ok") is True

    @property
    def error(self) -> str:
        """Why it failed: the program's one stderr line, else its reply's error, else stdout."""
        return (
            self.result.tail(1)
            or str((self.data or {}).get("error") or "")
            or self.result.tail(1, stream="stdout")
            or f"exit {self.result.returncode}"
        )

    def value(self, *, what: str) -> dict[str, Any]:
        """The reply of a successful run, else RemoteError naming ``what`` and why."""
        if not self.ok or self.data is None:
            raise RemoteError(f"{what} failed on {self.result.node}: {self.error}")
        return self.data


@dataclass(frozen=True)
class RemoteCall:
    """One verb of a remote program run with ``python``: ``<python> -m <module> <verb>`` with
    the request as JSON on stdin."""

    python: str
    module: str
    verb: str
    request: Request

    @property
    def argv(self) -> list[str]:
        """The command as an argv list."""
        return [self.python, "-m", self.module, self.verb]

    @property
    def command(self) -> str:
        """The command quoted for the node's shell."""
        return shlex.join(self.argv)

    @property
    def stdin(self) -> str:
        """The request as one JSON line."""
        return self.request.model_dump_json() + "\n"

    def display(self, note: str = "") -> str:
        """The call as one line for a person (``--dry-run``): the command, then a comment with
        ``note`` and the request it reads on stdin."""
        note = f"{note}; " if note else ""
        return f"{self.command}   # {note}stdin: {self.request.model_dump_json()}"

    def run(self, run: Callable[..., Result], **kwargs: Any) -> Reply:
        """Run the call with ``run`` (``Runner.run`` or ``UpContext.run_head``; ``kwargs`` such as
        ``what``, ``env``, ``timeout``, ``check`` go to it) and parse the reply."""
        result = run(self.command, stdin=self.stdin, **kwargs)
        return Reply(result, parse_reply(result.stdout))
