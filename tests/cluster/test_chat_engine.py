"""`llamacluster chat` in a pseudo-terminal against the real tiny-model server (gibberish out)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pytest

from cluster.chat import _server_eos_ids, eos_token_ids_from_dir
from cluster.endpoint import ApiTarget
from tests.support.server import ApiServer

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

CLI = str(Path(sys.executable).parent / "llamacluster")
PROMPT = "you> "
# The dim stats line: "N tokens · TTFT x ms · r tok/s · prompt P tokens · finish R|stopped".
# (A stopped answer has no usage, so no prompt count.)
STATS = re.compile(
    r"(\d+) tokens · TTFT [^·]+· [^·]+· (?:prompt (\d+) tokens · )?(finish \w+|stopped)"
)


@pytest.fixture
def key_file(api_server: ApiServer, tmp_path: Path) -> Path:
    path = tmp_path / "api_key"
    path.write_text(api_server.api_key + "\n")
    path.chmod(0o600)
    return path


def _args(api_server: ApiServer, key_file: Path, *extra: str) -> list[str]:
    return ["chat", "--base-url", api_server.base_url, "--api-key-file", str(key_file), *extra]


@pytest.fixture
def spawn():
    """Start the chat CLI in a pseudo-terminal; whatever is left is ended after the test."""
    children: list[pexpect.spawn] = []

    def start(args: list[str]) -> pexpect.spawn:
        child = pexpect.spawn(
            CLI, args, encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"}
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.isalive():
            child.close(force=True)


def _turn(child: pexpect.spawn, text: str) -> tuple[int, int, str]:
    child.expect_exact(PROMPT)
    child.sendline(text)
    child.expect(STATS)
    tokens, prompt, end = child.match.groups()
    return int(tokens), int(prompt), end


def test_two_turns_keep_history_and_reset_forgets(
    api_server: ApiServer, key_file: Path, spawn
) -> None:
    child = spawn(
        _args(api_server, key_file, "--max-tokens", "6", "--temperature", "0", "--eos-bias", "-100")
    )
    tokens1, prompt1, end1 = _turn(child, "hello there")
    assert (tokens1, end1) == (6, "finish length")
    _, prompt2, _ = _turn(child, "and again")
    # The second request carried the first question and answer.
    assert prompt2 > prompt1 + tokens1
    child.expect_exact(PROMPT)
    child.sendline("/reset")
    child.expect_exact("conversation reset")
    _, prompt3, _ = _turn(child, "hello there")
    assert prompt3 == prompt1
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(
    api_server: ApiServer, key_file: Path, spawn
) -> None:
    child = spawn(_args(api_server, key_file, "--max-tokens", "1800", "--eos-bias", "-100"))
    child.expect_exact(PROMPT)
    # Interrupt while the answer streams: once its first characters are on the terminal. The
    # terminal is read all along, as a person's is (an unread pseudo-terminal blocks the
    # client's writes while the server runs on). On a busy machine the client can fall so far
    # behind the server that the whole answer is in before the interrupt lands: then the
    # attempt says nothing, and the test tries again in a fresh conversation.
    for _ in range(3):
        generated_before = api_server.metric("vllm:generation_tokens_total")
        child.sendline("tell me a very long story")
        child.expect_exact("tell me a very long story")
        shown = ""
        deadline = time.monotonic() + 120
        while len(shown) < 100:
            assert time.monotonic() < deadline, f"the answer never started: {shown!r}"
            with contextlib.suppress(pexpect.TIMEOUT):
                shown += child.read_nonblocking(4096, timeout=0.05)
        child.sendintr()
        child.expect(STATS)
        end = child.match.group(3)
        child.expect_exact(PROMPT)  # still in the chat
        # The server aborted the request: it did not generate the whole 1800 tokens.
        deadline = time.monotonic() + 5
        while api_server.metric("vllm:num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        generated = api_server.metric("vllm:generation_tokens_total") - generated_before
        if end == "stopped" and generated < 1800:
            break
        child.sendline("/reset")
        child.expect_exact("conversation reset")
        child.expect_exact(PROMPT)
    assert end == "stopped" and 0 < generated < 1800, (end, generated)
    # And the next turn works.
    child.sendline("/system be short")
    child.expect_exact("system prompt set")
    child.expect_exact(PROMPT)
    child.sendline("hi")
    child.expect(r"\S{10}")
    child.sendintr()
    child.expect(STATS)
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_prompt_mode_prints_only_the_answer(api_server: ApiServer, key_file: Path) -> None:
    proc = subprocess.run(
        [CLI, *_args(api_server, key_file, "--prompt", "hi", "--max-tokens", "8",
                     "--eos-bias", "-100", "--seed", "3")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tokens" not in proc.stdout
    assert re.search(r"^8 tokens · .* finish length$", proc.stderr.strip(), re.M)


def test_large_eos_bias_ends_answers_at_once(api_server: ApiServer, key_file: Path) -> None:
    for seed in ("1", "2", "3"):
        proc = subprocess.run(
            [CLI, *_args(api_server, key_file, "--prompt", "tell me everything",
                         "--max-tokens", "200", "--eos-bias", "100", "--seed", seed)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        match = re.search(r"^(\d+) tokens · .* finish (\w+)$", proc.stderr.strip(), re.M)
        assert match, proc.stderr
        assert int(match.group(1)) <= 2 and match.group(2) == "stop"


def test_eos_ids_through_tokenize_match_the_model_files(
    api_server: ApiServer, demo_model_dir: Path
) -> None:
    target = ApiTarget(base_url=api_server.base_url, api_key=api_server.api_key)
    with httpx.Client(headers=api_server.auth, timeout=30) as http:
        ids = _server_eos_ids(http, target, api_server.model)
    assert ids and ids[0] in eos_token_ids_from_dir(demo_model_dir)
