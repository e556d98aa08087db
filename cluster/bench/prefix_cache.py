"""vLLM's prefix-cache hit rate over a benchmark: each replica's own counters
(``vllm:prefix_cache_hits`` and ``vllm:prefix_cache_queries``, in tokens) read from its
/metrics before and after every measured phase, the differences summed over the replicas.

With ``--name`` the replicas of a cluster are found from its state (every node's address at
each port of the replicas' range; a replica answering on several addresses of one host is
counted once); against any other server, its own /metrics (one engine behind it).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from cluster.bench.config import Endpoint, LoadPoint, tls_context
from cluster.bench.metrics import PointMetrics

# `vllm:prefix_cache_queries_total{engine="0",model_name="m"} 123.0` (a counter: prometheus
# adds `_total`; `_created` lines are timestamps and are skipped).
_COUNTER = re.compile(
    r"^vllm:prefix_cache_(hits|queries)(?:_total)?(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M
)


@dataclass(frozen=True)
class PrefixCounters:
    """Prompt tokens vLLM looked up in its prefix cache (queries) and found there (hits)."""

    hits: float = 0.0
    queries: float = 0.0

    @property
    def hit_rate(self) -> float | None:
        """hits / queries; None when nothing was looked up."""
        return self.hits / self.queries if self.queries > 0 else None


def parse_prefix_counters(text: str) -> PrefixCounters | None:
    """The prefix-cache counters of one /metrics page, summed over its label sets (engines);
    None when the page has none (not a vLLM server, or prefix caching off)."""
    sums = {"hits": 0.0, "queries": 0.0}
    found = False
    for kind, value in _COUNTER.findall(text):
        sums[kind] += float(value)
        found = True
    return PrefixCounters(**sums) if found else None


def counters_delta(
    before: Mapping[str, PrefixCounters], after: Mapping[str, PrefixCounters]
) -> PrefixCounters:
    """What the replicas read both times added over the run, summed. A replica whose
    counters went down was restarted in between: its new counts are the whole delta."""
    hits = queries = 0.0
    for source, end in after.items():
        begin = before.get(source)
        if begin is None:
            continue
        if end.hits < begin.hits or end.queries < begin.queries:
            begin = PrefixCounters()
        hits += end.hits - begin.hits
        queries += end.queries - begin.queries
    return PrefixCounters(hits=hits, queries=queries)


def read_counters(
    urls: Sequence[str], *, api_key: str | None, timeout_s: float = 10.0, verify: Any = True
) -> dict[str, PrefixCounters]:
    """Each metrics URL's counters; a URL that does not answer with them is left out
    (``verify``: what HTTPS URLs are checked with)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, PrefixCounters] = {}
    with httpx.Client(timeout=timeout_s, headers=headers, trust_env=False, verify=verify) as client:
        for url in urls:
            try:
                response = client.get(url)
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                counters = parse_prefix_counters(response.text)
                if counters is not None:
                    out[url] = counters
    return out


def replica_metric_urls(
    replicas: Sequence[Mapping[str, object]],
    addresses: Mapping[str, Sequence[str]],
    *,
    scheme: str = "http",
) -> dict[str, list[str]]:
    """Candidate /metrics URLs of each replica in Serve's routing table (``replica_id``,
    ``node_ip``, ``port``: the `replicas` verb's rows): its node's address, then the other
    addresses the state knows for that node (``addresses``: node IP -> more). Only these ports
    are asked (with the key): nothing else in the replicas' port range. ``scheme``: the
    endpoint's (with TLS the replicas speak HTTPS too)."""
    out: dict[str, list[str]] = {}
    for row in replicas:
        ip, port = row.get("node_ip"), row.get("port")
        if not ip or not port:
            continue  # starting or restarting: not in the routing table
        hosts = [str(ip), *(a for a in addresses.get(str(ip), ()) if a != ip)]
        out[str(row.get("replica_id"))] = [
            f"{scheme}://{_bracket(h)}:{port}/metrics" for h in hosts
        ]
    return out


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def find_replica_urls(
    candidates: Mapping[str, Sequence[str]], *, api_key: str | None, verify: Any = True
) -> list[str]:
    """One answering URL per replica (the first address of its host that answers)."""
    found = []
    for urls in candidates.values():
        answering = read_counters(urls, api_key=api_key, timeout_s=3.0, verify=verify)
        if answering:
            found.append(next(u for u in urls if u in answering))
    return found


@dataclass
class PrefixCacheObserver:
    """Reads the counters around every measured phase of the endpoints it knows the metrics
    of; adds ``prefix_cache_hit_rate`` (hits / queries, in prompt tokens), the tokens looked up
    (``prefix_cache_queries``) and how many replicas were read (``prefix_cache_replicas``)."""

    sources: dict[str, list[str]]  # endpoint name -> its replicas' /metrics URLs
    api_keys: dict[str, str | None]
    verify: dict[str, Any] = field(default_factory=dict)  # endpoint name -> its TLS check
    _before: dict[str, PrefixCounters] = field(default_factory=dict)
    _sums: dict[tuple[str, str], tuple[PrefixCounters, int]] = field(default_factory=dict)

    def phase_started(self, endpoint: Endpoint, point: LoadPoint, round_index: int) -> None:
        """Read the counters before the phase."""
        urls = self.sources.get(endpoint.name)
        if urls:
            self._before = read_counters(
                urls,
                api_key=self.api_keys.get(endpoint.name),
                verify=self.verify.get(endpoint.name, True),
            )

    def phase_finished(self, endpoint: Endpoint, point: LoadPoint, round_index: int) -> None:
        """Read them after; add the difference to this point's sums."""
        urls = self.sources.get(endpoint.name)
        if not urls:
            return
        after = read_counters(
            urls,
            api_key=self.api_keys.get(endpoint.name),
            verify=self.verify.get(endpoint.name, True),
        )
        delta = counters_delta(self._before, after)
        key = (endpoint.name, point.label)
        total, _ = self._sums.get(key, (PrefixCounters(), 0))
        read = len(set(self._before) & set(after))
        self._sums[key] = (
            PrefixCounters(total.hits + delta.hits, total.queries + delta.queries),
            read,
        )

    def columns(
        self, endpoint: Endpoint, point: LoadPoint, metrics: PointMetrics
    ) -> dict[str, float]:
        """The point's hit rate, tokens looked up and replicas read."""
        found = self._sums.get((endpoint.name, point.label))
        if found is None:
            return {}
        counters, replicas = found
        rate = counters.hit_rate
        out = {"prefix_cache_queries": counters.queries, "prefix_cache_replicas": float(replicas)}
        if rate is not None:
            out["prefix_cache_hit_rate"] = rate
        return out


def endpoint_metrics_url(base_url: str) -> str:
    """A server's own /metrics beside its /v1."""
    return base_url.removesuffix("/v1") + "/metrics"


def cluster_replicas(name: str) -> tuple[list[dict], dict[str, list[str]]]:
    """Cluster ``name``'s replicas from Serve's routing table (the `replicas` verb on the head,
    as `status` asks it), and node IP -> the further addresses its state records (SSH's)."""
    from cluster.recorded import RecordedCluster
    from cluster.stages.env import env_python
    from cluster.stages.serve import ray_driver_env, replicas_call

    recorded = RecordedCluster.load(name)
    state = recorded.state
    head, token = state.head, state.ray.head_token_path
    if head is None or state.ports is None or not token or not state.env.dir:
        return [], {}
    reply = replicas_call(
        env_python(str(state.env.dir)), f"{head.private_ip}:{state.ports.ray_gcs}"
    ).run(recorded.head_runner().run, env=ray_driver_env(token), timeout=120)
    if not reply.ok or reply.data is None:
        return [], {}
    addresses = {n.private_ip: [n.host] for n in state.nodes if n.private_ip and n.host}
    return list(reply.data.get("replicas") or []), addresses


def prefix_cache_observer(
    endpoints: Sequence[Endpoint], *, cluster: str | None, notes: list[str]
) -> PrefixCacheObserver:
    """The observer for a chat-sessions run: the cluster's replicas for its own endpoint
    (``main`` with ``--name``), every other endpoint's own /metrics."""
    sources: dict[str, list[str]] = {}
    keys = {e.name: e.api_key.get_secret_value() if e.api_key else None for e in endpoints}
    verify = {e.name: tls_context([e]) for e in endpoints}
    for endpoint in endpoints:
        urls = [endpoint_metrics_url(endpoint.base_url)]
        if cluster and endpoint.name == "main":
            from cluster.recorded import RecordedCluster

            state = RecordedCluster.load(cluster).state
            replicas = state.server.replicas
            if replicas > 1:
                rows, addresses = cluster_replicas(cluster)
                scheme = endpoint.base_url.split("://", 1)[0]
                candidates = replica_metric_urls(rows, addresses, scheme=scheme)
                # Each replica's own address need not be among the certificate's names: its
                # chain is what is checked (as HAProxy checks the replicas).
                check = verify[endpoint.name]
                if not isinstance(check, ssl.SSLContext):
                    check = ssl.create_default_context()
                check.check_hostname = False
                check.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
                found = find_replica_urls(candidates, api_key=keys[endpoint.name], verify=check)
                if len(found) < replicas:
                    notes.append(
                        f"prefix cache: {len(found)} of {replicas} replicas answered on their "
                        "own ports; the hit rate sums those"
                    )
                urls = found
        sources[endpoint.name] = urls
    return PrefixCacheObserver(sources=sources, api_keys=keys, verify=verify)
