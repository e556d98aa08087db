"""cluster.remote: the contract every remote program keeps, run in-process with fake streams."""

from __future__ import annotations

import io
import json

from pydantic import Field

from cluster.errors import NotReadyError
from cluster.remote import Request, Verb, VerbFailed, main, parse_reply


class EchoRequest(Request):
    text: str = Field(min_length=1)


def _echo(req: EchoRequest) -> dict:
    if req.text == "fail":
        raise VerbFailed("told to fail\nacross lines", exit_code=3, why="asked")
    if req.text == "late":
        raise NotReadyError("not there yet", hint="wait longer")
    if req.text == "bug":
        raise KeyError("oops")
    print("noise a library printed")  # before the reply: the reply is still the last line
    return {"echo": req.text}


VERBS = {"echo": Verb(EchoRequest, _echo)}


def _run(stdin: str, argv=("echo",)):
    out, err = io.StringIO(), io.StringIO()
    code = main(
        VERBS, prog="tests.echo", argv=list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err
    )
    return code, out.getvalue(), err.getvalue()


def test_success_prints_the_reply_as_the_last_stdout_line(capsys):
    code, out, err = _run('{"text": "hi"}')
    assert code == 0 and err == ""
    assert out.splitlines() == ['{"ok": true, "echo": "hi"}']
    assert capsys.readouterr().out == "noise a library printed\n"
    assert parse_reply("noise a library printed\n" + out + "\n") == {"ok": True, "echo": "hi"}


def test_an_expected_failure_has_its_exit_code_fields_and_one_stderr_line():
    code, out, err = _run('{"text": "fail"}')
    assert code == 3
    assert err == "told to fail across lines\n"
    assert json.loads(out) == {"ok": False, "error": "told to fail across lines", "why": "asked"}


def test_a_project_error_is_its_message_and_the_hint_rides_in_the_reply():
    code, out, err = _run('{"text": "late"}')
    assert code == 1
    assert err == "not there yet\n"
    assert json.loads(out) == {"ok": False, "error": "not there yet", "hint": "wait longer"}


def test_a_bug_keeps_its_traceback_before_the_one_line():
    code, out, err = _run('{"text": "bug"}')
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "KeyError: 'oops'"
    assert json.loads(out) == {"ok": False, "error": "KeyError: 'oops'"}


def test_bad_requests_exit_2_and_name_every_problem():
    code, out, err = _run('{"text": "", "more": 1}')
    assert code == 2
    assert err == (
        "bad echo request: text: String should have at least 1 character; "
        "more: Extra inputs are not permitted\n"
    )
    assert json.loads(out)["ok"] is False
    assert _run("{", argv=["echo"])[0] == 2
    assert (
        _run("{}", argv=["nope"])[2]
        == "usage: python -m tests.echo echo (one JSON request on stdin)\n"
    )


def test_parse_reply_takes_only_a_json_object_on_the_last_line():
    assert parse_reply("") is None
    assert parse_reply('{"ok": true}\nTraceback...\n') is None  # died after replying
    assert parse_reply('{"ok": true}\n[1]\n') is None
    assert parse_reply('{"ok": true}\n\n  \n') == {"ok": True}
