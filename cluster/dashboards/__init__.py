"""The cluster's dashboards: Prometheus console templates the monitor stage installs on the head."""

from __future__ import annotations

from importlib import resources

#: Console pages (served at ``/consoles/<name>``) and the library they share.
CONSOLES = ("index.html", "nodes.html")
LIBRARIES = ("llamacluster.lib",)
#: Charts every page shows, by element id: the browser test checks each has drawn data.
SERVING_CHARTS = (
    "requests",
    "errors",
    "tokens",
    "ttft",
    "itl",
    "queue",
    "kv_cache",
    "prefix_cache",
    "restarts",
)
NODE_CHARTS = ("node_cpu", "node_gpu", "node_mem", "node_net")


def text(name: str) -> str:
    """The text of one shipped console page or library file."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def files() -> dict[str, str]:
    """Every shipped file by its path under the monitor's directory."""
    out = {f"consoles/{n}": text(n) for n in CONSOLES}
    out.update({f"console_libraries/{n}": text(n) for n in LIBRARIES})
    return out
