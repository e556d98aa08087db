"""Inventory parsing (deploy/ips.txt) into a typed Cluster, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import ConfigError
from cluster.inventory import Cluster, load_inventory, local_cluster, parse_inventory

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "ips.txt.example"


def test_parses_every_form_head_first():
    cluster = parse_inventory(
        """
        # head first
        ubuntu@203.0.113.10 10.0.0.10   # head
        203.0.113.11:2222 10.0.0.11

        gpu-node-3
        root@[2001:db8::12]:22 10.0.0.12
        2001:db8::13
        """,
        source="ips.txt",
    )
    assert isinstance(cluster, Cluster) and len(cluster) == 5
    head = cluster.head
    assert (head.index, head.host, head.user, head.port, head.private_ip) == (
        0,
        "203.0.113.10",
        "ubuntu",
        None,
        "10.0.0.10",
    )
    assert head.is_head and head.name == "head" and head.line == 3
    assert [w.name for w in cluster.workers] == ["worker1", "worker2", "worker3", "worker4"]
    w1, alias, v6, bare6 = cluster.workers
    assert (w1.port, w1.user, w1.private_ip, w1.label) == (
        2222,
        None,
        "10.0.0.11",
        "203.0.113.11:2222",
    )
    assert (alias.host, alias.port, alias.private_ip, alias.address) == (
        "gpu-node-3",
        None,
        None,
        "gpu-node-3",
    )
    assert (v6.host, v6.port, v6.user, v6.label) == (
        "2001:db8::12",
        22,
        "root",
        "[2001:db8::12]:22",
    )
    assert (bare6.host, bare6.port) == ("2001:db8::13", None)
    assert head.address == "10.0.0.10"


def test_flag_defaults_fill_only_unset_fields(tmp_path):
    key = tmp_path / "id_ed25519"
    cluster = parse_inventory(
        "alice@h1\nh2:2200\n", default_user="ubuntu", default_port=22, identity_file=key
    )
    h1, h2 = cluster.nodes
    assert (h1.user, h1.port) == ("alice", 22)
    assert (h2.user, h2.port) == ("ubuntu", 2200)
    assert h1.identity_file == key and h2.identity_file == key
    # Without flags nothing is forced, so ~/.ssh/config decides user, port and key.
    plain = parse_inventory("h1\n").head
    assert (plain.user, plain.port, plain.identity_file) == (None, None, None)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("good\nhost:abc\n", 2, "bad port 'abc'"),
        ("h:0\n", 1, "bad port '0'"),
        ("h:70000\n", 1, "bad port '70000'"),
        ("a\n# c\nb 10.0.0.1\na\n", 4, "duplicate node 'a' (already on line 1)"),
        ("a:22\nA:22\n", 2, "duplicate node"),
        ("a b c\n", 1, "too many fields"),
        ("a 10.0.0.300\n", 1, "private IP '10.0.0.300'"),
        ("bad_host!\n", 1, "not a valid host"),
        ("[2001:db8::1\n", 1, "unclosed"),
        ("[notv6]:22\n", 1, "not an IPv6 address"),
        ("2001:db8::zz\n", 1, "IPv6"),
        ("us er@h\n", 1, "private IP 'er@h'"),
        ("@h\n", 1, "not a valid user"),
    ],
)
def test_errors_name_file_and_line(text, line, needle):
    with pytest.raises(ConfigError) as info:
        parse_inventory(text, source="deploy/ips.txt")
    err = info.value
    assert err.exit_code == 3
    assert err.message.startswith(f"deploy/ips.txt:{line}: "), err.message
    assert needle in err.message
    assert err.hint  # says how to fix it


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n   # more\n"])
def test_empty_inventory_says_how_to_fill_it(text):
    with pytest.raises(ConfigError, match="no nodes listed") as info:
        parse_inventory(text, source="ips.txt")
    assert "head first" in info.value.hint


def test_missing_file_points_to_the_example(tmp_path):
    with pytest.raises(ConfigError, match="not found") as info:
        load_inventory(tmp_path / "ips.txt")
    assert "ips.txt.example" in info.value.hint


def test_load_reads_the_file_once_and_keeps_its_path(tmp_path):
    path = tmp_path / "ips.txt"
    path.write_text("10.0.0.1\n10.0.0.2\n")
    cluster = load_inventory(path)
    assert cluster.source == path and [n.host for n in cluster] == ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(ConfigError, match="bad SSH port"):
        load_inventory(path, default_port=0)


def test_example_file_documents_a_valid_inventory():
    text = EXAMPLE.read_text()
    assert "[user@]host[:port] [private-ip]" in text
    with pytest.raises(ConfigError, match="no nodes"):  # everything in it is commented out
        parse_inventory(text)
    examples = text.split("# Examples:", 1)[1]
    uncommented = "\n".join(line.removeprefix("# ") for line in examples.splitlines())
    cluster = parse_inventory(uncommented + "\n")
    assert len(cluster) >= 3 and cluster.head.private_ip == "10.0.0.10"


def test_select_by_name_host_or_index():
    cluster = parse_inventory("h0 10.0.0.1\nh1\nh2:2222\n")
    assert [n.host for n in cluster.select(["worker2", "h0"])] == ["h0", "h2"]
    assert [n.host for n in cluster.select(["1", "10.0.0.1"])] == ["h0", "h1"]
    with pytest.raises(ConfigError, match="no node matches 'nope'"):
        cluster.select(["nope"])


def test_local_cluster_is_one_local_node():
    cluster = local_cluster()
    assert len(cluster) == 1 and cluster.head.local and cluster.head.host == "127.0.0.1"
    assert cluster.workers == ()


def test_ipv6_zones_are_kept_for_ssh_and_refused_when_unsafe_or_for_ray():
    cluster = parse_inventory("fe80::7%eth0\nops@[fe80::8%2]:2222\n", source="ips.txt")
    assert [n.host for n in cluster] == ["fe80::7%eth0", "fe80::8%2"]
    assert cluster.workers[0].label == "[fe80::8%2]:2222"
    for line, words in (
        ("fe80::7%$(reboot)", "bad IPv6 zone"),
        ("[fe80::7%a;b]:22", "bad IPv6 zone"),
        ("fe80::7%eth0 fe80::9%eth0", "has an IPv6 zone"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_inventory(line, source="ips.txt")
        assert words in str(err.value) and "ips.txt:1" in str(err.value)


def test_user_names_are_limited_to_safe_characters():
    assert parse_inventory("a.b-c_1@h").head.user == "a.b-c_1"
    for bad in ("-oProxyCommand=x@h", "a:b@h", "$(id)@h", "u\x1b[31m@h", f"{'u' * 40}@h"):
        with pytest.raises(ConfigError, match="not a valid user name"):
            parse_inventory(bad)
    with pytest.raises(ConfigError, match="--ssh-user: '-oProxyCommand=x' is not a valid"):
        parse_inventory("h", default_user="-oProxyCommand=x")
