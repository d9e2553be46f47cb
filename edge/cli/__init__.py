"""The beamloop command line: closed-loop edge inference for STEM.

Every subcommand lives in its own module (:data:`COMMAND_MODULES`): ``run`` (the main job on the simulated
microscope), ``sim`` (the simulated microscope), ``serve`` (the edge service), ``find`` (atomic columns in
image files), ``replay`` (stream recorded frames to a service), and the features' commands. Each module
exposes ``register(subparsers)``, which adds parsers whose ``func`` takes the parsed arguments and returns an
exit status. Modules import heavy optional packages (torch, brevitas, hls4ml) inside their command
functions, never at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from beamloop.edge import __version__
from beamloop.edge.cli.types import parse_positive, parse_shape  # noqa: F401  (TEMPORARY until streams.cli has its own)

COMMAND_MODULES = (
    "beamloop.edge.cli.run",        # the main job: closed loop on the simulated microscope
    "beamloop.edge.cli.sim",        # the simulated microscope as a server
    "beamloop.edge.cli.serve",      # the edge service on a frame stream
    "beamloop.edge.cli.find",       # atomic columns in image files
    "beamloop.edge.cli.replay",     # stream recorded frames to a service
    "beamloop.streams.cli",         # detector streams: receive, record, stream (DECTRIS SIMPLON v1 / Stream V2)
    "beamloop.edge.learn.cli",      # segmentation network: train, export
    "beamloop.quantize.cli",        # trigger models: quantization-aware training, evaluation, export
    "beamloop.fpga.cli",            # trigger logic: hls4ml and open RTL flows, simulation, bitstreams
    "beamloop.bench.cli",           # the benchmark suite
    "beamloop.edge.cli.keys",       # key pairs for the CURVE-secured bridge
)
"""Modules that add subcommands, in the order of ``beamloop --help`` (a module whose optional
dependencies are not installed is skipped)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``beamloop`` command."""
    p = argparse.ArgumentParser(prog="beamloop", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"beamloop {__version__}")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that feature is not part of this installation
            raise
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``beamloop`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"beamloop {args.command}: error: {exc}", file=sys.stderr)
        return 1

