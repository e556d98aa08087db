"""The typer application, shared options, and the one place that turns errors into exit codes."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from cluster import __version__
from cluster.errors import LlamaclusterError

app = typer.Typer(
    name="llamacluster",
    help="Turn a list of machines into a Ray-orchestrated, OpenAI-compatible LLM serving cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, emoji=False)
# Wide tables keep their columns when stdout is a file or a pipe (rich assumes 80 columns there).
PIPE_WIDTH = 220


def table_console() -> Console:
    """A stdout console for tables: the terminal's width, or PIPE_WIDTH columns when stdout is
    not a terminal and COLUMNS does not say otherwise."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(emoji=False)
    return Console(width=PIPE_WIDTH, emoji=False)


def debug_enabled() -> bool:
    """LLAMACLUSTER_DEBUG=1 shows tracebacks instead of one-line errors."""
    return os.environ.get("LLAMACLUSTER_DEBUG", "") not in ("", "0", "false", "no")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"llamacluster {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Turn a list of machines into a Ray-orchestrated, OpenAI-compatible LLM serving cluster."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; print one line per error (a traceback only with LLAMACLUSTER_DEBUG=1)."""
    try:
        app(args=argv, standalone_mode=False)
    except LlamaclusterError as exc:
        if debug_enabled():
            raise
        # The line can carry a node's own text (an error tail): never read it as markup.
        err_console.print(
            f"[bold red]error:[/] {escape(exc.one_line())}", highlight=False, soft_wrap=True
        )
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except SystemExit as exc:  # typer.Exit inside commands
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # the CLI's last line of defence
        if debug_enabled():
            raise
        import click

        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("[yellow]aborted[/]")
            return 130
        err_console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))} "
            "(run again with LLAMACLUSTER_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return 0


def run() -> None:
    """Console-script entry: exit with main()'s code."""
    sys.exit(main())


# Command modules register themselves on `app` when imported. Keep this list in --help order.
from cluster.cli import commands  # noqa: E402,F401
