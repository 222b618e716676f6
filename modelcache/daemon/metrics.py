"""The daemon's Prometheus metrics, in a registry of its own (no process globals).

Label values are bounded: ``source`` is the kind of origin (``oci``,
``oci-layout``, ``s3``, ``hf``, ``file``), never a model reference, so a node
that pulls a thousand models still exports a handful of series.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..store.scrub import Corrupt, Verdict
from ..transfer import TransferStats

_KINDS = ("oci", "oci-layout", "s3", "hf", "file", "peer")  # "peer": bytes other nodes gave us


def source_kind(name: str) -> str:
    """The bounded label for a byte source named ``scheme://...``."""
    scheme = name.partition("://")[0]
    return scheme if scheme in _KINDS else "other"


class _Gauges(Collector):
    """Gauges computed when scraped: store bytes used and free, mounts active."""

    def __init__(self, used: Callable[[], int], free_path: str, mounts: Callable[[], int]) -> None:
        self._used, self._free_path, self._mounts = used, free_path, mounts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("modelcache_store_bytes_used", "Bytes held in committed blobs.", value=self._used())
        yield GaugeMetricFamily("modelcache_store_bytes_free", "Free bytes on the store's filesystem.",
                                value=shutil.disk_usage(self._free_path).free)
        yield GaugeMetricFamily("modelcache_mounts_active", "Volumes published to pods.", value=self._mounts())


class Metrics:
    """Counters and histograms the pull manager and CSI driver update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fetched = Counter("modelcache_fetched_bytes", "Bytes fetched, by kind of source.", ["source"],
                               registry=self.registry)
        self.hits = Counter("modelcache_cache_hits",
                            "Model requests served from the store without fetching (warm mounts, pulls).",
                            registry=self.registry)
        self.misses = Counter("modelcache_cache_misses", "Pulls that fetched bytes.", registry=self.registry)
        self.retried = Counter("modelcache_chunks_retried", "Chunk requests retried.", registry=self.registry)
        self.pull_seconds = Histogram("modelcache_pull_duration_seconds", "Pull durations.", ["outcome"],
                                      buckets=(0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600),
                                      registry=self.registry)
        self.peer_served = Counter("modelcache_peer_served_bytes", "Bytes served to other nodes.",
                                   registry=self.registry)
        self.peer_failures = Counter("modelcache_peer_failures", "Requests to a peer that failed (dead, stalled).",
                                     ["peer"], registry=self.registry)
        self.bad_pieces = Counter("modelcache_peer_bad_pieces", "Pieces or blobs from a peer that failed their check.",
                                  ["peer"], registry=self.registry)
        self.publishes = Counter("modelcache_csi_publish", "NodePublishVolume calls by gRPC code.", ["code"],
                                 registry=self.registry)
        self.publish_seconds = Histogram("modelcache_csi_publish_duration_seconds",
                                         "NodePublishVolume latency (warm mounts should stay in the first buckets).",
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2, 10, 60, 300),
                                         registry=self.registry)

        self.scrubbed = Counter("modelcache_scrub_blobs", "Blobs the background scrub checked.",
                                ["algorithm"], registry=self.registry)
        self.scrubbed_bytes = Counter("modelcache_scrub_bytes", "Bytes the background scrub read.",
                                      registry=self.registry)
        self.corrupt = Counter("modelcache_scrub_corrupt", "Corrupt blobs the scrub found and took out of service.",
                               registry=self.registry)

    def record_scrub(self, verdict: Verdict) -> None:
        """Account one blob checked by the scrub (one that vanished under it is not counted)."""
        if verdict.state != "gone":
            self.scrubbed.labels(algorithm=verdict.algorithm).inc()
            self.scrubbed_bytes.inc(verdict.size)

    def record_corrupt(self, corrupt: Corrupt) -> None:
        """Account one corrupt blob taken out of service."""
        self.corrupt.inc()

    def peer_outcome(self, url: str, outcome: str) -> None:
        """A peer failed (dead, stalled, refused) or served a bad piece."""
        if outcome == "failed":
            self.peer_failures.labels(peer=url).inc()
        elif outcome == "lied":
            self.bad_pieces.labels(peer=url).inc()

    def add_gauges(self, used: Callable[[], int], free_path: str, mounts: Callable[[], int]) -> None:
        """Register the scrape-time gauges."""
        self.registry.register(_Gauges(used, free_path, mounts))

    def record_pull(self, stats: TransferStats, seconds: float, outcome: str) -> None:
        """Account one finished pull."""
        for source, n in stats.fetched_by_source.items():
            self.fetched.labels(source=source_kind(source)).inc(n)
        if outcome == "done":
            (self.misses if stats.bytes_fetched else self.hits).inc()
        self.retried.inc(stats.chunks_retried)
        self.pull_seconds.labels(outcome=outcome).observe(seconds)

    def record_publish(self, code: str, seconds: float) -> None:
        """Account one NodePublishVolume call."""
        self.publishes.labels(code=code).inc()
        self.publish_seconds.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
