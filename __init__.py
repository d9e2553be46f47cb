"""beamloop: low-latency edge inference for scanning transmission electron microscopes (STEM).

The distribution's top-level folders are its sub-packages:

=====================  ====================================================================================
``beamloop.edge``      the service: frame contract, stages, kernels, trigger, control bridge, simulator, CLI
``beamloop.streams``   detector stream protocols (native, DECTRIS SIMPLON v1 and Stream V2): receivers,
                       senders, recorders
``beamloop.quantize``  Brevitas quantization-aware training and export of trigger models
``beamloop.fpga``      hls4ml and open RTL flows: trigger models compiled to FPGA logic
``beamloop.bench``     benchmarks writing JSON, plots and a summary
=====================  ====================================================================================

The Python API for notebooks and scripts is :mod:`beamloop.edge.api`; its names are available here
too, imported on first use so that ``import beamloop`` stays cheap::

    import beamloop
    cols = beamloop.find_columns(image, pixel_size_A=0.15, material="MoS2")
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("find_columns", "find_in_file", "frame_path", "open_receiver", "connect_bridge", "run_closed_loop",
        "simulated_frame")


def __getattr__(name: str):
    """Names of :mod:`beamloop.edge.api`, imported when first used."""
    if name in _API:
        from beamloop.edge import api

        return getattr(api, name)
    raise AttributeError(f"module 'beamloop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
