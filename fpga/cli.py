"""``beamloop fpga``: compile trigger models to logic (open RTL flow to an ECP5 bitstream, hls4ml C simulation).

- ``beamloop fpga build MODEL --target ecp5-85k|<xilinx part> --out DIR``: trace the QONNX model to da4ml
  Verilog inside the trigger wrapper, simulate it cycle by cycle (cocotb + Icarus) against QONNX,
  C-simulate the hls4ml project, and for an ECP5 target synthesize (yosys), place and route (nextpnr) and
  pack a ``.bit``; writes ``DIR/report.json`` and ``DIR/report.md``.
- ``beamloop fpga sim MODEL --out DIR``: the RTL simulation only.

MODEL is a QONNX file or a shipped model's name (``ejection``). hls4ml, da4ml, cocotb and the yowasp
tools (the ``fpga`` extra) and Icarus Verilog (``apt-get install iverilog``) are needed; they are imported
by the command functions only.
"""

from __future__ import annotations

import argparse
import sys

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF


def _progress(line: str) -> None:
    print(f"[fpga] {line}", file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="QONNX file or shipped trigger model name (e.g. ejection)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples", type=int, default=10_000, help="test inputs for the bit-exactness checks")
    p.add_argument("--latency-cutoff", type=float, default=DEFAULT_LATENCY_CUTOFF,
                   help="da4ml adder delays per pipeline stage (smaller: more stages, higher fmax; default "
                        f"{DEFAULT_LATENCY_CUTOFF:g} meets 100 MHz and 200 ns for the ejection trigger on ECP5-85F)")
    p.add_argument("--seed", type=int, default=0)


def _check(a: argparse.Namespace) -> None:
    if a.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {a.samples}")


def _cmd_build(a: argparse.Namespace) -> int:
    from beamloop.fpga.flow import build

    _check(a)
    rep = build(a.model, a.target, a.out, samples=a.samples, latency_cutoff=a.latency_cutoff, freq_mhz=a.freq,
                seed=a.seed, run_sim=not a.no_sim, run_hls=not a.no_hls, progress=_progress)
    return _summary(rep)


def _cmd_sim(a: argparse.Namespace) -> int:
    from beamloop.fpga.flow import sim

    _check(a)
    return _summary(sim(a.model, a.out, samples=a.samples, latency_cutoff=a.latency_cutoff, seed=a.seed,
                        progress=_progress))


def _summary(rep: dict) -> int:
    """Print the report's Markdown; exit status 1 when a bit-exactness check failed."""
    from beamloop.fpga.report import markdown

    print(markdown(rep))
    fracs = [(rep.get(k) or {}).get("bit_exact_fraction") for k in ("sim", "hls")]
    return 0 if all(f is None or f == 1.0 for f in fracs) else 1


def register(subparsers) -> None:
    """Add ``fpga build`` and ``fpga sim`` to the ``beamloop`` command line."""
    p = subparsers.add_parser("fpga", help="compile trigger models to FPGA logic (RTL, simulation, bitstream)")
    sub = p.add_subparsers(dest="fpga_command", required=True)
    b = sub.add_parser("build", help="RTL + simulation + hls4ml C simulation + synthesis/bitstream, with a report")
    _common(b)
    b.add_argument("--target", default="ecp5-85k",
                   help="ecp5-85k|ecp5-45k|ecp5-25k|ecp5-12k (open flow to .bit) or a Xilinx part number")
    b.add_argument("--freq", type=float, default=100.0, help="clock constraint for place and route, MHz")
    b.add_argument("--no-sim", action="store_true", help="skip the RTL simulation")
    b.add_argument("--no-hls", action="store_true", help="skip the hls4ml path")
    b.set_defaults(func=_cmd_build)
    s = sub.add_parser("sim", help="cycle-accurate RTL simulation (cocotb + Icarus) against QONNX")
    _common(s)
    s.set_defaults(func=_cmd_sim)
