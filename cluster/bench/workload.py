"""Seeded, reproducible request lists: random prompts, the bundled prompt set, JSONL and ShareGPT
files, and chat sessions (conversations sharing a long system prompt, turn by turn)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cluster.bench.config import WorkloadConfig
from cluster.bench.tokenizer import LocalTokenizer
from cluster.errors import ConfigError

# Short common words; most BPE vocabularies hold each as one token (with its leading space), so
# n words make roughly n tokens when no tokenizer is at hand. Counts are then flagged approximate.
_WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "big",
    "high",
    "different",
    "small",
    "large",
    "next",
    "early",
    "young",
    "important",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "make",
    "take",
    "come",
    "give",
    "find",
    "tell",
]


@dataclass(frozen=True)
class BenchRequest:
    """One request's content: a prompt or chat messages, and its output budget."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    input_tokens: int | None = None  # expected prompt tokens (content only), when known
    input_exact: bool = False  # True when input_tokens came from the model's tokenizer

    def as_messages(self) -> list[dict[str, Any]]:
        """Chat messages for /chat/completions."""
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt or ""}]

    def as_prompt(self) -> str:
        """Plain prompt for /completions (messages are joined one per line)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(str(m.get("content", "")) for m in self.messages or ())


@dataclass
class Workload:
    """Produces request i deterministically from the seed; warm-up requests never repeat them."""

    config: WorkloadConfig
    tokenizer: LocalTokenizer | None = None
    pool: list[BenchRequest] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _cache: dict[int, BenchRequest] = field(default_factory=dict, repr=False)

    @property
    def exact_lengths(self) -> bool:
        """True when prompt lengths are counted with the model's own tokenizer."""
        return self.tokenizer is not None

    def request(self, index: int) -> BenchRequest:
        """Measured request ``index`` (≥ 0); warm-up requests use negative indices."""
        cached = self._cache.get(index)
        if cached is None:
            cached = self._make(index)
            if len(self._cache) < 100_000:
                self._cache[index] = cached
        return cached

    def requests(self, start: int, count: int) -> list[BenchRequest]:
        """Requests start .. start+count-1 (built before a timed phase so timing stays clean)."""
        return [self.request(i) for i in range(start, start + count)]

    def warmup(self, count: int, *, offset: int = 0) -> list[BenchRequest]:
        """Warm-up requests, distinct from every measured one (so prefix caches do not flatter)."""
        return [self.request(-1 - offset - k) for k in range(count)]

    def _make(self, index: int) -> BenchRequest:
        if self.config.dataset == "random":
            return self._random(index)
        n = len(self.pool)
        return self.pool[index % n]

    def _text(self, rng: random.Random, n_tokens: int) -> str:
        if n_tokens <= 0:
            return ""
        if self.tokenizer is None:
            return " ".join(rng.choices(_WORDS, k=n_tokens))
        return random_text(self.tokenizer, n_tokens, rng)[0]

    def _random(self, index: int) -> BenchRequest:
        rng = random.Random(self.config.seed * 1_000_003 + index)
        n_in, n_out = self.config.input_len, self.config.output_len
        if self.tokenizer is None:
            words = rng.choices(_WORDS, k=n_in)
            return BenchRequest(max_tokens=n_out, prompt=" ".join(words), input_tokens=n_in)
        text, count = random_text(self.tokenizer, n_in, rng)
        return BenchRequest(
            max_tokens=n_out, prompt=text, input_tokens=count, input_exact=count == n_in
        )

    # --- chat sessions ---------------------------------------------------------------------------

    @property
    def sessions(self) -> bool:
        """True for the chat-sessions workload (conversations, turn by turn)."""
        return self.config.workload == "chat-sessions"

    def system_prompt(self) -> str:
        """The system prompt every conversation shares (same seed, same text)."""
        cached = self._cache.get(_SYSTEM_KEY)
        if cached is None:
            rng = random.Random(f"system:{self.config.seed}")
            text = self._text(rng, self.config.system_prompt_len)
            cached = BenchRequest(max_tokens=0, prompt=text)
            self._cache[_SYSTEM_KEY] = cached
        return cached.prompt or ""

    def user_turn(self, conversation: int, turn: int) -> str:
        """The user's message of one turn of one conversation (seeded by both)."""
        rng = random.Random(f"user:{self.config.seed}:{conversation}:{turn}")
        return self._text(rng, self.config.input_len)

    def session_request(
        self, conversation: int, turn: int, history: Sequence[tuple[str, str]]
    ) -> BenchRequest:
        """Turn ``turn`` of ``conversation``: the system prompt, the earlier turns and their
        answers (``history``: (user, answer) pairs), then this turn's user message."""
        messages = conversation_messages(
            self.system_prompt(), history, self.user_turn(conversation, turn)
        )
        return BenchRequest(max_tokens=self.config.output_len, messages=messages)


# The system prompt's slot in a workload's request cache (request indices are ints).
_SYSTEM_KEY: Any = "system"


def conversation_messages(
    system: str, history: Sequence[tuple[str, str]], question: str
) -> list[dict[str, Any]]:
    """A conversation so far as chat messages: the system prompt (when not empty), each earlier
    turn's user message and answer in order, then the new user message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for user, answer in history:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": question})
    return messages


def session_turns(total: int, turns: int) -> list[int]:
    """How many turns each conversation of a phase of ``total`` requests gets: full
    conversations of ``turns``, the last one shorter when ``total`` is not a multiple."""
    full, rest = divmod(total, turns)
    return [turns] * full + ([rest] if rest else [])


def random_text(tokenizer: LocalTokenizer, n_tokens: int, rng: random.Random) -> tuple[str, int]:
    """Random text that encodes to ``n_tokens`` tokens (nearest reached, with its count).

    Decoding random ids and encoding the text again rarely gives the same ids, so the length is
    corrected a few times by cutting or appending tokens.
    """
    ids = rng.choices(tokenizer.plain_ids, k=n_tokens)
    best_text, best_count = "", -1
    for _ in range(12):
        text = tokenizer.decode(ids)
        got = tokenizer.encode(text)
        if abs(len(got) - n_tokens) < abs(best_count - n_tokens):
            best_text, best_count = text, len(got)
        if len(got) == n_tokens:
            break
        if len(got) > n_tokens:
            ids = got[:n_tokens]
        else:
            ids = got + rng.choices(tokenizer.plain_ids, k=n_tokens - len(got))
    return best_text, best_count


def load_workload(config: WorkloadConfig, *, tokenizer: LocalTokenizer | None) -> Workload:
    """Build the workload; file datasets are read and validated here (ConfigError on bad lines)."""
    workload = Workload(config=config, tokenizer=tokenizer)
    if config.dataset == "random":
        if tokenizer is None:
            workload.notes.append(
                "no local tokenizer: random prompt lengths are approximate (one word ≈ one token)"
            )
        return workload
    if config.dataset == "prompts":
        text = resources.files("cluster.bench").joinpath("data/prompts.jsonl").read_text()
        rows = _parse_jsonl(text, source="bundled prompts")
    elif config.dataset == "jsonl":
        assert config.dataset_path is not None
        rows = _parse_jsonl(_read(config.dataset_path), source=str(config.dataset_path))
    else:
        assert config.dataset_path is not None
        rows = _parse_sharegpt(config.dataset_path, tokenizer=tokenizer, notes=workload.notes)
    pool = [_row_request(row, config=config, tokenizer=tokenizer) for row in rows]
    if config.api == "completions" and any(r.prompt is None for r in pool):
        workload.notes.append("chat messages are sent to /completions joined one per line")
    random.Random(config.seed).shuffle(pool)
    workload.pool = pool
    return workload


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc}") from None


def _parse_jsonl(text: str, *, source: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(
                f"{source} line {lineno} is not JSON",
                hint='each line must be {"prompt": "...", "max_tokens": N} or {"messages": [...]}',
            ) from None
        if not isinstance(row, dict) or not (
            isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
        ):
            raise ConfigError(
                f"{source} line {lineno} has neither a 'prompt' string nor a 'messages' list",
                hint='write {"prompt": "...", "max_tokens": 64}',
            )
        rows.append(row)
    if not rows:
        raise ConfigError(f"{source} holds no requests")
    return rows


def _row_request(
    row: dict[str, Any], *, config: WorkloadConfig, tokenizer: LocalTokenizer | None
) -> BenchRequest:
    max_tokens = row.get("max_tokens", row.get("max_completion_tokens"))
    if config.output_len_override or max_tokens is None:
        max_tokens = config.output_len
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(
            f"bad max_tokens {max_tokens!r} in dataset row", hint="use a whole number ≥ 1"
        )
    prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
    messages = row.get("messages") if prompt is None else None
    content = (
        prompt if prompt is not None else " ".join(str(m.get("content", "")) for m in messages)
    )
    n_in = tokenizer.count(content) if tokenizer else None
    return BenchRequest(
        max_tokens=max_tokens,
        prompt=prompt,
        messages=messages,
        input_tokens=n_in,
        input_exact=tokenizer is not None,
    )


def _parse_sharegpt(
    path: Path, *, tokenizer: LocalTokenizer | None, notes: list[str]
) -> list[dict[str, Any]]:
    text = _read(path)
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise ConfigError(
                f"{path} is neither a JSON list nor JSONL", hint="expected ShareGPT format"
            ) from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of conversations (ShareGPT format)")
    rows = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in (first, second)
        ):
            continue
        if first.get("from") not in ("human", "user") or not first["value"].strip():
            continue
        reply = second["value"]
        out = tokenizer.count(reply) if tokenizer is not None else round(len(reply.split()) * 1.3)
        rows.append({"prompt": first["value"], "max_tokens": max(out, 1)})
    if not rows:
        raise ConfigError(
            f"{path} holds no usable ShareGPT conversations",
            hint='each item needs "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]',
        )
    if tokenizer is None:
        notes.append("no local tokenizer: ShareGPT output lengths estimated from word counts")
    return rows
