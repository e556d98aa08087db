"""Chat library pieces without a server: EOS lookup, logit bias, input, commands, saving."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cluster.chat import (
    AnswerStats,
    Conversation,
    SamplingOptions,
    eos_logit_bias,
    eos_token_ids_from_dir,
    format_stats,
    parse_command,
    read_message,
)
from cluster.endpoint import resolve_target
from cluster.errors import ConfigError


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def test_eos_from_generation_config_wins(tmp_path: Path) -> None:
    _write(tmp_path / "generation_config.json", {"eos_token_id": [128001, 128009]})
    _write(tmp_path / "config.json", {"eos_token_id": 2})
    assert eos_token_ids_from_dir(tmp_path) == [128001, 128009]


def test_eos_from_config_json(tmp_path: Path) -> None:
    _write(tmp_path / "config.json", {"eos_token_id": 2})
    assert eos_token_ids_from_dir(tmp_path) == [2]


def test_eos_from_tokenizer_files(tmp_path: Path) -> None:
    _write(tmp_path / "tokenizer_config.json", {"eos_token": {"content": "<|im_end|>"}})
    _write(
        tmp_path / "tokenizer.json",
        {"added_tokens": [{"id": 7, "content": "<|im_end|>"}], "model": {"vocab": {}}},
    )
    assert eos_token_ids_from_dir(tmp_path) == [7]
    _write(tmp_path / "tokenizer_config.json", {"eos_token": "</s>"})
    _write(tmp_path / "tokenizer.json", {"model": {"vocab": {"</s>": 3}}})
    assert eos_token_ids_from_dir(tmp_path) == [3]


def test_eos_unknown_is_empty(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert eos_token_ids_from_dir(tmp_path) == []


def test_logit_bias_is_clamped_and_keyed_by_string() -> None:
    assert eos_logit_bias([9, 5, 9], 250) == {"5": 100.0, "9": 100.0}
    assert eos_logit_bias([5], -3.5) == {"5": -3.5}


def test_sampling_fields_leave_out_unset() -> None:
    opts = SamplingOptions(temperature=0.0, max_tokens=8)
    assert opts.request_fields() == {"temperature": 0.0, "max_tokens": 8}


def _reader(lines: list[str]):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_multiline_input() -> None:
    read = _reader(["first \\", "second", '"""', "a", "", "b", '"""', "plain"])
    assert read_message(read, prompt="> ", more=". ") == "first \nsecond"
    assert read_message(read, prompt="> ", more=". ") == "a\n\nb"
    assert read_message(read, prompt="> ", more=". ") == "plain"
    with pytest.raises(EOFError):
        read_message(read, prompt="> ", more=". ")


def test_commands() -> None:
    assert parse_command("/save out.json") == ("/save", "out.json")
    assert parse_command("  /RESET ") == ("/reset", "")
    assert parse_command("hello /reset") is None
    assert parse_command("/not\na command") is None


def test_stats_line() -> None:
    line = format_stats(AnswerStats(tokens=11, ttft_s=0.05, total_s=1.05, finish_reason="length"))
    assert line == "11 tokens · TTFT 50 ms · 10.0 tok/s · finish length"
    stopped = AnswerStats(tokens=0, ttft_s=None, total_s=0.2, finish_reason=None, interrupted=True)
    assert format_stats(stopped) == "0 tokens · TTFT - · - tok/s · stopped"


def test_conversation_save_is_atomic_json(tmp_path: Path) -> None:
    convo = Conversation(system="be brief")
    convo.turns += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = convo.save(tmp_path / "chat.json", model="m", options=SamplingOptions(seed=1))
    data = json.loads(path.read_text())
    assert data["messages"][0] == {"role": "system", "content": "be brief"}
    assert len(data["messages"]) == 3 and data["sampling"] == {"seed": 1}
    assert os.listdir(tmp_path) == ["chat.json"]
    with pytest.raises(ConfigError, match="no directory"):
        convo.save(tmp_path / "missing" / "x.json", model="m", options=SamplingOptions())
    convo.set_system("")
    assert convo.messages() == []


def test_target_from_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    target = resolve_target(base_url="http://h:8000/")
    assert target.base_url == "http://h:8000/v1" and target.api_key == "env-key"
    key = tmp_path / "key"
    key.write_text("file-key\n")
    key.chmod(0o600)
    assert resolve_target(base_url="http://h/v1", api_key_file=key).api_key == "file-key"
    with pytest.raises(ConfigError, match="no endpoint"):
        resolve_target()
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="no cluster named"):
        resolve_target(name="nope")


def test_ctrl_c_stops_an_answer_even_when_sigint_was_ignored(stream_server, tmp_path) -> None:
    """A chat started with SIGINT ignored (a background job of a non-interactive shell passes
    that on) still stops an answer on Ctrl-C: against the loopback SSE server, 2000 tokens
    20 ms apart (40 s if nothing stopped it)."""
    import signal
    import sys

    import pexpect

    from tests.support.stream_server import StreamBehaviour

    stream_server.behaviour = StreamBehaviour(ttft_ms=5, itl_ms=20)
    key = tmp_path / "key"
    key.write_text("secret-key-123\n")
    key.chmod(0o600)
    child = pexpect.spawn(
        str(Path(sys.executable).parent / "llamacluster"),
        ["chat", "--base-url", stream_server.base_url, "--api-key-file", str(key),
         "--max-tokens", "2000"],
        encoding="utf-8",
        timeout=60,
        env={**os.environ, "TERM": "dumb"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        child.expect_exact("you> ")
        child.sendline("hi")
        child.expect(r"( t\d+){5}")  # the answer is streaming
        started = time.monotonic()
        child.sendintr()
        child.expect(r"(\d+) tokens · .*(finish \w+|stopped)")
        assert child.match.group(2) == "stopped" and time.monotonic() - started < 10
        child.expect_exact("you> ")  # still in the chat
    finally:
        child.close(force=True)
