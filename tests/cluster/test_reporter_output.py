"""What `up` prints stays what it means: a certificate fingerprint (colon-separated hex) is not
turned into emoji by rich (``:AB:`` is one) nor folded at the console's width."""

from __future__ import annotations

import io

from rich.console import Console

from cluster.stages.base import Reporter
from cluster.tls import fingerprint_sha256, self_signed

# A fingerprint with the emoji codes rich knows among its bytes (:AB:, :CL:, :ID:, :OK:).
FINGERPRINT = ":".join(["AB", "CL", "ID", "OK", "SOS", "VS"] * 6)


def test_a_fingerprint_is_printed_as_it_is_whatever_the_console(tmp_path) -> None:
    out = io.StringIO()
    # A console as a caller might pass one: rich's defaults, emoji on, 40 columns.
    reporter = Reporter(Console(file=out, width=40))
    reporter.print(f"  SHA-256:  {FINGERPRINT}")
    assert out.getvalue() == f"  SHA-256:  {FINGERPRINT}\n"
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    self_signed(["127.0.0.1"], cert_path=cert, key_path=key)
    real = fingerprint_sha256(cert)
    reporter.print(f"  SHA-256:  {real}")
    assert out.getvalue().splitlines()[-1] == f"  SHA-256:  {real}"


def test_the_cli_consoles_do_not_replace_emoji_codes() -> None:
    from cluster.cli.app import err_console, table_console

    for console in (err_console, table_console(), Reporter().console):
        # How the console turns a string into text (no output: the consoles are shared).
        assert console.render_str(FINGERPRINT).plain == FINGERPRINT
