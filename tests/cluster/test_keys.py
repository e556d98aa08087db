"""Key files: the reader's contract, named keys (add, revoke, rotate) and the `keys` command."""

from __future__ import annotations

import json
import stat
import threading

import pytest

from cluster import keys as k
from cluster import state as st
from cluster.cli.app import main
from cluster.errors import ConfigError


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACLUSTER_HOME", str(tmp_path / "home"))


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _key_file(tmp_path, text: str):
    path = tmp_path / "api_key"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_reader_contract_is_unchanged(tmp_path):
    path = _key_file(tmp_path, "\n# comment\n  sk-one  \nsk-two\n")
    assert k.read_api_keys(path) == ["sk-one", "sk-two"]
    assert k.read_api_key(path) == "sk-one"
    path.chmod(0o640)
    with pytest.raises(k.KeyFileError, match="chmod 600"):
        k.read_api_keys(path)
    path.chmod(0o600)
    path.write_text("# only a comment\n")
    with pytest.raises(k.KeyFileError, match="holds no key"):
        k.read_api_keys(path)
    with pytest.raises(k.KeyFileError, match="does not exist"):
        k.read_api_keys(tmp_path / "missing")


def test_plain_file_keys_are_named_by_position(tmp_path):
    path = _key_file(tmp_path, "sk-one\nsk-two\n")
    listed = k.list_keys(path)
    assert [(x.name, x.created) for x in listed] == [("key-1", None), ("key-2", None)]
    assert listed[0].fingerprint == k.key_sha256("sk-one")[:12]
    assert "sk-one" not in repr(listed[0])


def test_add_appends_a_named_random_key_keeping_the_first(tmp_path):
    path = _key_file(tmp_path, "sk-one\n# keep me\nsk-two")  # no final newline
    added = k.add_key(path, "ci")
    assert added.secret.startswith(k.KEY_PREFIX) and len(added.secret) == len(k.KEY_PREFIX) + 64
    assert added.created and added.created.endswith("+00:00")
    assert path.read_text() == f"sk-one\n# keep me\nsk-two\n{added.secret}\n"
    assert k.read_api_key(path) == "sk-one"  # clients keep sending the first key
    assert [x.name for x in k.list_keys(path)] == ["key-1", "key-2", "ci"]
    meta = json.loads(k.meta_path(path).read_text())
    assert added.secret not in k.meta_path(path).read_text()
    assert meta["keys"][k.key_sha256(added.secret)] == {"name": "ci", "created": added.created}
    assert _mode(path) == 0o600 and _mode(k.meta_path(path)) == 0o600
    # no temp file left next to them
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".api_key.lock",
        "api_key",
        "api_key.meta.json",
    ]
    with pytest.raises(ConfigError, match="exists already"):
        k.add_key(path, "ci")
    with pytest.raises(ConfigError, match="not a usable key name"):
        k.add_key(path, "-bad")


def test_names_stay_put_when_a_key_before_them_goes(tmp_path):
    path = _key_file(tmp_path, "sk-one\nsk-two\nsk-three\n")
    k.add_key(path, "ci")  # the first edit writes every key's name down
    gone = k.revoke_key(path, "key-1")
    assert gone.secret == "sk-one"
    assert [x.name for x in k.list_keys(path)] == ["key-2", "key-3", "ci"]
    assert k.read_api_keys(path)[:2] == ["sk-two", "sk-three"]
    assert set(json.loads(k.meta_path(path).read_text())["keys"]) == {
        k.key_sha256(s) for s in k.read_api_keys(path)
    }


def test_revoke_drops_every_copy_and_keeps_comments(tmp_path):
    path = _key_file(tmp_path, "# team keys\nsk-one\nsk-two\nsk-one\n")
    assert [x.name for x in k.list_keys(path)] == ["key-1", "key-2"]  # a repeated key is one
    k.revoke_key(path, "key-1")
    assert path.read_text() == "# team keys\nsk-two\n"


def test_the_last_key_is_never_revoked(tmp_path):
    path = _key_file(tmp_path, "sk-only\n")
    with pytest.raises(ConfigError, match="only API key") as err:
        k.revoke_key(path, "key-1")
    assert "keys add" in err.value.one_line()
    assert path.read_text() == "sk-only\n"
    with pytest.raises(ConfigError, match="no API key named 'nope'") as err:
        k.revoke_key(path, "nope")
    assert "the keys are: key-1" in err.value.one_line()


def test_rotate_replaces_the_secret_in_place(tmp_path):
    path = _key_file(tmp_path, "sk-one\nsk-two\n")
    new = k.rotate_key(path, "key-1")
    assert new.name == "key-1" and new.secret != "sk-one" and new.created
    assert k.read_api_keys(path) == [new.secret, "sk-two"]  # still the one clients send
    assert [(x.name, x.created) for x in k.list_keys(path)] == [
        ("key-1", new.created),
        ("key-2", None),
    ]


def test_open_files_and_broken_sidecars_are_refused(tmp_path):
    path = _key_file(tmp_path, "sk-one\n")
    path.chmod(0o644)
    with pytest.raises(k.KeyFileError, match="readable by others"):
        k.add_key(path, "ci")
    path.chmod(0o600)
    k.meta_path(path).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the key names"):
        k.list_keys(path)
    two = {k.key_sha256(s): {"name": "same"} for s in ("sk-one", "sk-two")}
    path.write_text("sk-one\nsk-two\n")
    k.meta_path(path).write_text(json.dumps({"version": 1, "keys": two}))
    with pytest.raises(ConfigError, match="two API keys are named 'same'"):
        k.list_keys(path)


def test_concurrent_adds_lose_nothing(tmp_path):
    path = _key_file(tmp_path, "sk-one\n")
    threads = [threading.Thread(target=k.add_key, args=(path, f"n{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(x.name for x in k.list_keys(path)) == sorted(
        ["key-1", *(f"n{i}" for i in range(8))]
    )


def test_a_failed_write_leaves_both_files_as_they_were(tmp_path, monkeypatch):
    path = _key_file(tmp_path, "sk-one\nsk-two\n")
    k.add_key(path, "ci")
    before = (path.read_text(), k.meta_path(path).read_text())
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cluster.files.os.replace", failing_replace)
    with pytest.raises(OSError):
        k.revoke_key(path, "ci")
    assert calls
    assert (path.read_text(), k.meta_path(path).read_text()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- the command ------------------------------------------------------------------------------


def test_cli_with_a_key_file(tmp_path, capsys):
    path = _key_file(tmp_path, "sk-one\n")
    assert main(["keys", "add", "ci", "--key-file", str(path)]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret == k.read_api_keys(path)[1]  # stdout is the secret alone, printed this once
    assert secret not in err and "added key 'ci'" in err

    assert main(["keys", "list", "--key-file", str(path)]) == 0
    out, err = capsys.readouterr()
    assert secret not in out and "sk-one" not in out
    assert "ci" in out and k.key_sha256(secret)[:12] in out and "key-1" in out

    assert main(["keys", "rotate", "ci", "--key-file", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() != secret and k.read_api_keys(path) == ["sk-one", out.strip()]

    assert main(["keys", "revoke", "ci", "--key-file", str(path)]) == 0
    capsys.readouterr()
    assert main(["keys", "revoke", "key-1", "--key-file", str(path)]) == 3
    _, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "only API key" in err
    assert k.read_api_keys(path) == ["sk-one"]


def test_cli_edits_a_recorded_clusters_key_file(tmp_path, capsys):
    key = _key_file(tmp_path, "sk-one\n")
    state = st.ClusterState(name="kc", access=st.Access(local=True), shared_dir=str(tmp_path))
    state.secrets = st.Secrets(ray_token=str(tmp_path / "token"), api_key_file=str(key))
    state.save()
    assert main(["keys", "add", "ops", "--name", "kc"]) == 0
    out, err = capsys.readouterr()
    assert k.read_api_keys(key) == ["sk-one", out.strip()]
    assert "serves nothing now" in err  # nothing deployed: the next `up` uses the file
    assert main(["keys", "list", "--name", "nope"]) == 3
    _, err = capsys.readouterr()
    assert "no cluster named" in err
