"""The live view and the metrics of a running service (``--http HOST:PORT`` of ``serve`` and ``run``).

- :mod:`~beamloop.edge.monitor.board`: :class:`~beamloop.edge.monitor.board.MonitorBoard`, where the service
  publishes the latest frame, its columns and targets, and the dwells, cheaply (a rate-limited copy into a
  preallocated buffer; references to the per-frame results), and where the web thread reads them.
- :mod:`~beamloop.edge.monitor.metrics`: the Prometheus collector (counters and fixed-bucket latency
  histograms read from the board when scraped).
- :mod:`~beamloop.edge.monitor.web`: the aiohttp server in a thread of its own: the page, its JSON and PNG
  endpoints, ``/metrics``, and the operator's stop button (blank through the bridge).
- :mod:`~beamloop.edge.monitor.auth`: the address and token rules (loopback free; beyond it a bearer token
  derived from the bridge client's CURVE secret key).
- :mod:`~beamloop.edge.monitor.browser`: a headless Chromium driven over the DevTools protocol (tests, bench).

The hot path never encodes, serialises or waits for the web thread: encoding happens in the web thread, at
the rate the page polls.
"""
