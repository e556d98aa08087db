"""The `llamacluster` command line: it only turns flags into calls of library functions."""

from cluster.cli.app import app, main

__all__ = ["app", "main"]
