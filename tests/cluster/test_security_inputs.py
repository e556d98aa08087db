"""Inputs that reach shells and terminals: control characters in paths, markup in node text."""

from __future__ import annotations

import io

import pytest
from pydantic import ValidationError
from rich.console import Console

from cluster.cli.app import main
from cluster.stages.base import Reporter, StageOutcome
from cluster.stages.config import UpConfig, path_fields


def test_every_path_setting_is_checked():
    names = path_fields(UpConfig)
    assert {"inventory", "shared_dir", "env", "cache_dir", "api_key_file", "tls_cert"} <= set(names)
    assert "model" not in names and "tp" not in names


@pytest.mark.parametrize("field", path_fields(UpConfig))
def test_control_characters_are_refused_in_every_path(field):
    with pytest.raises(ValidationError, match="has a control character"):
        UpConfig(**{field: "/srv/a\nrm -rf /"})
    with pytest.raises(ValidationError, match="has a control character"):
        UpConfig(**{field: "/srv/\x1b]0;x\x07"})
    # A plain path passes this check (a setting may still need a partner or an existing file).
    try:
        assert getattr(UpConfig(**{field: "/srv/ok dir"}), field) is not None
    except ValidationError as exc:
        assert "control character" not in str(exc)


def test_up_says_in_one_line_which_path_is_bad(capsys):
    assert main(["up", "--local", "--dry-run", "--shared-dir", "/srv/a\rb"]) != 0
    err = capsys.readouterr().err.strip()
    assert "control character" in err and len(err.splitlines()) == 1


def test_node_text_is_shown_as_it_is_not_as_markup():
    out = io.StringIO()
    reporter = Reporter(Console(file=out, width=300, color_system=None))
    hostile = "Ubuntu [bold red]FAKE OK[/] [/] [link=http://x]y[/link]"
    reporter.node("[red]n1[/]", hostile)
    reporter.info(hostile)
    reporter.warn(hostile)
    reporter.info("skipped: [x]", style="dim")
    reporter.outcome("env", StageOutcome("failed", hostile), 1.0)
    text = out.getvalue()
    assert text.count(hostile) == 4 and "[red]n1[/]" in text and "skipped: [x]" in text
