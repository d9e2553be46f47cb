"""Prometheus metrics of a running service, read from its :class:`~beamloop.edge.monitor.board.MonitorBoard`
when scraped (``/metrics``): the hot path only increments its own integers and histogram buckets.

Exposition format: the Prometheus text format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/),
written by prometheus-client. Metrics:

- ``beamloop_<counter>_total`` for every counter of :data:`beamloop.edge.monitor.board.COUNTER_NAMES` the
  service has;
- ``beamloop_stage_latency_seconds`` (histogram, label ``stage``): every latency sample of the service's
  :class:`~beamloop.edge.frame.latency.LatencyRecorder`, in fixed buckets at the powers of two from
  ``2**10`` ns (1.02 us) to ``2**34`` ns (17.2 s); a bucket counts the samples below its ``le`` (the
  recorder's buckets end at powers of two);
- ``beamloop_dwell_reasons_total`` (label ``reason``): dwells by why they ended;
- ``beamloop_view_frames_copied_total``: frames the live view copied.
"""

from __future__ import annotations

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from beamloop.edge.frame.latency import bucket_edges
from beamloop.edge.monitor.board import COUNTER_NAMES, MonitorBoard

OCTAVES = tuple(range(10, 35))
"""Powers of two (nanoseconds) that are the ``le`` bounds of the latency histogram."""

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of :func:`render`'s bytes."""


class BoardCollector:
    """A prometheus-client collector reading a :class:`MonitorBoard` at each scrape.

    Parameters
    ----------
    board : MonitorBoard
    """

    def __init__(self, board: MonitorBoard) -> None:
        self.board = board
        edges = bucket_edges()
        self._cut = [int(v) for v in edges.searchsorted([1 << k for k in OCTAVES])]

    def collect(self):
        """The metric families (see the module docstring), built from the board's values now."""
        b = self.board
        for name, value in b.counter_values().items():
            yield CounterMetricFamily(f"beamloop_{name}", COUNTER_NAMES[name], value=value)
        reasons = CounterMetricFamily("beamloop_dwell_reasons", "dwells by why they ended", labels=["reason"])
        for reason, n in sorted(b.reasons.items()):
            reasons.add_metric([reason], n)
        yield reasons
        yield CounterMetricFamily("beamloop_view_frames_copied", "frames the live view copied",
                                  value=b.frames_copied)
        if b.latency is None:
            return
        hist = HistogramMetricFamily("beamloop_stage_latency_seconds",
                                     "latency per stage (the recorder's samples), seconds", labels=["stage"])
        for stage in b.latency.stages:
            h = b.latency.histogram(stage)
            n, total_ns, _ = b.latency.totals(stage)
            if n == 0:
                continue
            cum = h.cumsum()
            buckets = [(f"{(1 << k) / 1e9:.9g}", float(cum[i - 1]) if i > 0 else 0.0)
                       for k, i in zip(OCTAVES, self._cut)]
            buckets.append(("+Inf", float(cum[-1])))
            hist.add_metric([stage], buckets, sum_value=total_ns / 1e9)
        yield hist


def registry_of(board: MonitorBoard) -> CollectorRegistry:
    """A registry of its own (not prometheus-client's global one) holding a :class:`BoardCollector`."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BoardCollector(board))
    return reg


def render(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (UTF-8 bytes, :data:`CONTENT_TYPE`)."""
    return generate_latest(registry)
