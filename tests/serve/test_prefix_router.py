"""The prefix router's policy: routing text, chained block hashes, the choice and its memory."""

from __future__ import annotations

import json

import pytest

from serve.balancer import BALANCE_ENV, FORWARD_BODY_ENV, balancer_env
from serve.config import ServeConfig
from serve.prefix_router import (
    LEAST_LOAD,
    PREFIX,
    Candidate,
    Decision,
    LoadBook,
    PrefixIndex,
    PrefixPolicy,
    block_chain,
    body_text,
    choose_replica,
    matched_blocks,
    prompt_text,
)

POLICY = PrefixPolicy(block_chars=16, min_match_blocks=2, load_slack=1)


def test_chat_messages_render_in_order_and_a_longer_conversation_extends_the_text():
    turn1 = [{"role": "system", "content": "S" * 40}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    first, second = prompt_text({"messages": turn1}), prompt_text({"messages": turn2})
    assert first is not None and second is not None
    assert second.startswith(first)
    assert first.index("S" * 40) < first.index("hi")
    # Content given as parts counts its text; the same words as a string give the same text.
    parts = [{"type": "text", "text": "S" * 40}]
    assert prompt_text({"messages": [{"role": "system", "content": parts}]}) == prompt_text(
        {"messages": [{"role": "system", "content": "S" * 40}]}
    )
    assert prompt_text({"prompt": "plain"}) == "plain"
    assert prompt_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert prompt_text({"model": "m"}) is None
    assert prompt_text(["not", "a", "body"]) is None


def test_a_body_cut_short_is_judged_by_its_own_characters():
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 100}]}).encode()
    assert body_text(body) == prompt_text(json.loads(body))
    assert body_text(body[:50]) == body[:50].decode()
    assert body_text(b"") is None


def test_block_hashes_are_chained_so_equal_hashes_mean_equal_prefixes():
    a = block_chain("a" * 16 + "b" * 16 + "c" * 16 + "tail", 16)
    b = block_chain("a" * 16 + "b" * 16 + "X" * 16, 16)
    c = block_chain("Z" * 16 + "b" * 16, 16)
    assert len(a) == 3  # the partial block "tail" is not hashed
    assert a[:2] == b[:2] and a[2] != b[2]
    # The same block after a different prefix hashes differently.
    assert c[1] != a[1]
    assert block_chain("short", 16) == []


def test_matched_blocks_is_the_longest_prefix_held():
    chain = block_chain("".join(chr(65 + i) * 16 for i in range(5)), 16)
    assert matched_blocks(chain, set(chain[:3])) == 3
    assert matched_blocks(chain, {chain[3]}) == 4  # a chained hash implies its prefix
    assert matched_blocks(chain, set()) == 0


def test_the_longest_match_wins_unless_it_is_busier_than_the_slack():
    cands = [Candidate("r1", outstanding=1, matched=5), Candidate("r2", outstanding=0, matched=2)]
    assert choose_replica(cands, POLICY).replica_id == "r1"
    assert choose_replica(cands, POLICY).reason == PREFIX
    busy = [Candidate("r1", outstanding=3, matched=5), Candidate("r2", outstanding=1, matched=2)]
    decision = choose_replica(busy, POLICY)
    assert (decision.replica_id, decision.reason) == ("r2", LEAST_LOAD)


def test_a_prefix_every_replica_holds_is_routed_by_load():
    # Both hold the shared system prompt (5 blocks): the busier one gains nothing from it.
    shared = [Candidate("r1", outstanding=1, matched=5), Candidate("r2", outstanding=0, matched=5)]
    assert choose_replica(shared, POLICY) == Decision("r2", 5, LEAST_LOAD)
    # One block more than the other holds (a conversation's first question past the shared
    # prompt) is the conversation's own: back to r1, within the slack.
    one_more = [Candidate("r1", 1, matched=6), Candidate("r2", 0, matched=5)]
    assert choose_replica(one_more, POLICY) == Decision("r1", 6, PREFIX)
    # Asking for a lead of two blocks makes that one block too little: by load.
    two = POLICY.model_copy(update={"min_lead_blocks": 2})
    assert choose_replica(one_more, two).reason == LEAST_LOAD
    # The conversation's own history on r1 (3 blocks past the shared prompt): back to r1.
    history = [Candidate("r1", 1, matched=8), Candidate("r2", 0, matched=5)]
    assert choose_replica(history, POLICY) == Decision("r1", 8, PREFIX)


def test_a_short_match_is_routed_by_load_and_ties_go_to_the_emptier_replica():
    short = [Candidate("r1", 0, matched=1, known=10), Candidate("r2", 0, matched=0, known=0)]
    # One block is under the threshold: load decides; equal load, the longer match.
    assert choose_replica(short, POLICY).replica_id == "r1"
    assert choose_replica(short, POLICY).reason == LEAST_LOAD
    fresh = [Candidate("r1", 0, matched=0, known=10), Candidate("r2", 0, matched=0, known=0)]
    assert choose_replica(fresh, POLICY).replica_id == "r2"
    with pytest.raises(ValueError):
        choose_replica([], POLICY)


def test_index_remembers_what_each_replica_was_sent_within_its_bound():
    index = PrefixIndex(max_blocks_per_replica=4)
    conversation = block_chain("".join(chr(65 + i) * 16 for i in range(3)), 16)
    index.record("r1", conversation)
    assert index.matched("r1", conversation) == 3 and index.matched("r2", conversation) == 0
    other = block_chain("".join(chr(97 + i) * 16 for i in range(3)), 16)
    index.record("r1", other)  # 6 blocks into room for 4: the oldest go first
    assert index.known("r1") == 4
    assert index.matched("r1", other) == 3
    assert index.matched("r1", conversation) == 1  # its tail went first, its head is kept
    index.keep_only(["r2"])
    assert index.known("r1") == 0


def test_load_book_counts_what_it_routed_until_a_probe_answers():
    book = LoadBook(in_flight_s=0.05, silent_s=2.0)
    assert book.estimate("r1") is None and book.oldest(["r1"]) is None
    book.probed("r1", 3, sent_at=10.0, answered_at=10.01)
    book.probed("r2", 0, sent_at=11.0, answered_at=11.01)
    assert book.oldest(["r1", "r2"]) == 10.0 and book.oldest(["r1", "r3"]) is None
    book.routed("r2", at=11.5)
    book.routed("r2", at=11.6)
    assert (book.estimate("r1"), book.estimate("r2")) == (3, 2)
    # A probe sent at 12.0 answers 1 (one of the two finished): both were routed well before
    # it, so the answer holds them; one routed 10 ms before it may still be on its way to the
    # replica (not in the answer): it stays counted, as does one routed after it went out.
    book.routed("r2", at=11.99)
    book.routed("r2", at=12.02)
    book.probed("r2", 1, sent_at=12.0, answered_at=12.05)
    assert book.estimate("r2") == 1 + 2 and book.oldest(["r2"]) == 12.0
    # An older probe's answer arriving late changes nothing.
    book.probed("r2", 9, sent_at=11.8, answered_at=12.06)
    assert book.estimate("r2") == 3
    # A replica silent for more than silent_s is not offered (r1 last answered at 10.01).
    assert book.estimate("r1", now=11.0) == 3 and book.estimate("r1", now=12.5) is None
    book.keep_only(["r2"])
    assert book.estimate("r1") is None and book.estimate("r2") == 3


def test_a_sequence_of_conversations_sticks_and_spreads_with_load():
    """Simulated: two replicas, conversations sharing a system prompt, requests in flight."""
    index = PrefixIndex(1000)
    system = "S" * 64
    load = {"r1": 0, "r2": 0}
    placed = {}
    for conv in range(4):
        text = system + f"conversation {conv} " * 4
        chain = block_chain(text, 16)
        cands = [
            Candidate(r, load[r], index.matched(r, chain), index.known(r)) for r in sorted(load)
        ]
        decision = choose_replica(cands, POLICY)
        index.record(decision.replica_id, chain)
        load[decision.replica_id] += 1  # each conversation keeps a request running
        placed[conv] = decision.replica_id
    # The shared system prompt pulls towards one replica until the slack sends one on; from
    # then on both hold it, and new conversations go by load: two each.
    assert sorted(load.values()) == [2, 2]
    # A later turn of each conversation goes back to where its first turn went.
    for conv in range(4):
        chain = block_chain(system + f"conversation {conv} " * 4 + "and more " * 4, 16)
        cands = [Candidate(r, 0, index.matched(r, chain), index.known(r)) for r in sorted(load)]
        assert choose_replica(cands, POLICY).replica_id == placed[conv]


def test_balancer_follows_the_routing_setting(tmp_path):
    def env(routing):
        config = ServeConfig(model="m", no_auth=True, num_replicas=2, routing=routing)
        return balancer_env(config, str(tmp_path))

    assert env("least-load")[BALANCE_ENV] == "leastconn"
    assert env("round-robin")[BALANCE_ENV] == "roundrobin"
    assert FORWARD_BODY_ENV not in env("least-load")
    assert env("prefix")[FORWARD_BODY_ENV] == "1"
    with pytest.raises(ValueError, match="routing"):
        ServeConfig(model="m", no_auth=True, routing="hash")
