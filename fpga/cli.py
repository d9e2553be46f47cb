"""``beamloop fpga``: compile trigger models to logic (open RTL flow to an ECP5 bitstream, hls4ml C simulation).

- ``beamloop fpga build MODEL --target ecp5-85k|<xilinx part> --out DIR``: write the whole trigger IP
  (:mod:`beamloop.fpga.ip`: raw samples in through AXI4-Stream, history, block sums, the model, threshold,
  latching blank, Wishbone / AXI4-Lite registers), stream dwells through it cycle by cycle (cocotb + Icarus)
  against the integer runtime, C-simulate the network's hls4ml project, and for an ECP5 target synthesize
  (yosys), place and route (nextpnr) and pack a ``.bit``; writes ``DIR/report.json`` (fmax, latency_ns,
  bit_exact_fraction) and ``DIR/report.md`` (with the register map). ``--record`` stores the latency in the
  model's manifest entry for the controller-side emulation.
- ``beamloop fpga sim MODEL --out DIR [--stream FILE]``: the stream simulation only. FILE is an ``.npz`` of
  dwells (``beamloop quantize streams`` writes simulated parked-probe dwells); without it, Poisson dwells
  with a rate drop (:func:`beamloop.fpga.ip_sim.synthetic_dwells`).

``--model-only`` runs the earlier flow instead: the network alone on a ready feature vector, compared with
QONNX on random vectors. MODEL is a shipped model's name (``ejection``), a model folder or a file in one
(QONNX for ``--model-only``). hls4ml, da4ml, cocotb and the yowasp tools (the ``fpga`` extra) and Icarus
Verilog (``apt-get install iverilog``) are needed; they are imported by the command functions only.
"""

from __future__ import annotations

import argparse
import sys

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF


def _progress(line: str) -> None:
    print(f"[fpga] {line}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="shipped trigger model name (e.g. ejection), model folder, or a file in one")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-only", action="store_true",
                   help="the network alone on a ready feature vector, against QONNX on random vectors")
    p.add_argument("--samples", type=int, default=10_000,
                   help="random test inputs of the model-only checks and of the hls4ml C simulation")
    p.add_argument("--latency-cutoff", type=float, default=DEFAULT_LATENCY_CUTOFF,
                   help="da4ml adder delays per pipeline stage of the latency path (smaller: more stages, higher "
                        f"fmax; default {DEFAULT_LATENCY_CUTOFF:g})")
    p.add_argument("--pre-cutoff", type=float, default=None,
                   help="the same for the IP's precompute (default --latency-cutoff); sets the sample interval only")
    p.add_argument("--history", choices=("sr", "lutram"), default="sr",
                   help="block delay lines as shift registers (sr) or LUT RAM circular buffers (lutram)")
    p.add_argument("--stream", default=None, help="dwells to stream through the IP (.npz, beamloop quantize streams)")
    p.add_argument("--dwells", type=int, default=8, help="synthetic dwells without --stream")
    p.add_argument("--dwell-samples", type=int, default=1000, help="samples per synthetic dwell")
    p.add_argument("--bus", choices=("wb", "axil"), default="wb", help="register bus of the simulated top")
    p.add_argument("--seed", type=int, default=0)


def _check(a: argparse.Namespace) -> None:
    if a.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {a.samples}")
    if a.dwells < 1 or a.dwell_samples < 1:
        raise ValueError("--dwells and --dwell-samples must be >= 1")


def _dwells(a: argparse.Namespace):
    from beamloop.fpga.ip_sim import Dwells, synthetic_dwells

    return Dwells.load(a.stream) if a.stream else synthetic_dwells(a.dwells, a.dwell_samples, a.seed)


def _cmd_build(a: argparse.Namespace) -> int:
    from beamloop.fpga.flow import build, model_build

    _check(a)
    if a.model_only:
        rep = model_build(a.model, a.target, a.out, samples=a.samples, latency_cutoff=a.latency_cutoff,
                          freq_mhz=a.freq, seed=a.seed, run_sim=not a.no_sim, run_hls=not a.no_hls, progress=_progress)
    else:
        rep = build(a.model, a.target, a.out, dwells=_dwells(a), latency_cutoff=a.latency_cutoff, freq_mhz=a.freq,
                    run_sim=not a.no_sim, run_hls=not a.no_hls, history_impl=a.history, pre_cutoff=a.pre_cutoff,
                    hls_samples=a.samples, record=a.record, progress=_progress)
    return _summary(rep)


def _cmd_sim(a: argparse.Namespace) -> int:
    from beamloop.fpga.flow import model_sim, sim

    _check(a)
    if a.model_only:
        return _summary(model_sim(a.model, a.out, samples=a.samples, latency_cutoff=a.latency_cutoff, seed=a.seed,
                                  progress=_progress))
    return _summary(sim(a.model, a.out, dwells=_dwells(a), latency_cutoff=a.latency_cutoff, bus=a.bus,
                        history_impl=a.history, pre_cutoff=a.pre_cutoff, progress=_progress))


def _summary(rep: dict) -> int:
    """Print the report's Markdown; exit status 1 when a bit-exactness check failed."""
    from beamloop.fpga.report import markdown

    print(markdown(rep))
    fracs = [(rep.get(k) or {}).get("bit_exact_fraction") for k in ("sim", "hls")]
    ok = all(f is None or f == 1.0 for f in fracs) and (rep.get("sim") or {}).get("all_exact", True)
    return 0 if ok else 1


def register(subparsers) -> None:
    """Add ``fpga build`` and ``fpga sim`` to the ``beamloop`` command line."""
    p = subparsers.add_parser("fpga", help="compile trigger models to FPGA logic (RTL, simulation, bitstream)")
    sub = p.add_subparsers(dest="fpga_command", required=True)
    b = sub.add_parser("build", help="trigger IP RTL + stream simulation + hls4ml C simulation + synthesis/bitstream")
    _common(b)
    b.add_argument("--target", default="ecp5-85k",
                   help="ecp5-85k|ecp5-45k|ecp5-25k|ecp5-12k (open flow to .bit) or a Xilinx part number")
    b.add_argument("--freq-mhz", "--freq", dest="freq",
                   type=float, default=100.0, help="clock constraint for place and route, MHz")
    b.add_argument("--no-sim", action="store_true", help="skip the RTL simulation")
    b.add_argument("--no-hls", action="store_true", help="skip the hls4ml path")
    b.add_argument("--record", action="store_true",
                   help="store the measured latency in the model's manifest entry (logic), read by ModelTrigger")
    b.set_defaults(func=_cmd_build)
    s = sub.add_parser("sim", help="cycle-accurate simulation of the trigger IP on dwells (cocotb + Icarus) against "
                                   "the integer runtime")
    _common(s)
    s.set_defaults(func=_cmd_sim)
