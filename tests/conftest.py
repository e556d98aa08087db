"""Shared pytest setup: fixture modules from tests/support are registered here."""

# Fixture modules (each owns its fixtures); pytest loads them for every test.
pytest_plugins: list[str] = [
    "tests.support.fixtures",
    "tests.support.stream_server",
]
