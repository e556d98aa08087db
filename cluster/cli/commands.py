"""Imports every command module so each registers its commands on the app, in --help order."""

# One import per command module; each module owns its own commands. The order here is the order
# of `llamacluster --help`, so it is kept by hand (ruff's import sorting is off for this file).
from cluster.cli import demo_cmd  # noqa: F401
from cluster.cli import cluster_cmd  # noqa: F401
from cluster.cli import ssh_cmd  # noqa: F401
from cluster.cli import chat_cmd  # noqa: F401
from cluster.cli import top_cmd  # noqa: F401
from cluster.cli import serve_cmd  # noqa: F401
from cluster.cli import keys_cmd  # noqa: F401
from cluster.cli import download_cmd  # noqa: F401
from cluster.cli import bench_cmd  # noqa: F401
from cluster.cli import plan_cmd  # noqa: F401
from cluster.cli import model_cmd  # noqa: F401
