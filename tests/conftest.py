"""Shared pytest setup: fixture modules from tests/support are registered here."""

# Fixture modules (each owns its fixtures); pytest loads them for every test.
pytest_plugins: list[str] = [
    "tests.support.hub",
    "tests.support.stream_server",
    "tests.support.sshd",
    "tests.support.ray_cluster",
    "tests.support.server",
    "tests.support.netns",
]
