"""Cycle-accurate simulation of the trigger RTL with cocotb and Icarus Verilog, checked against QONNX.

:func:`simulate` compiles the wrapper and da4ml's Verilog with Icarus (``iverilog``, Debian package
``iverilog``), runs the cocotb beamloop.bench :mod:`beamloop.fpga.cocotb_trigger` and compares every score word with the
QONNX graph executed by qonnx (:func:`beamloop.fpga.qonnx_trace.qonnx_reference`): bit-exact means
``score_word * output_step == qonnx_output`` exactly. It also checks the wrapper's decisions
(``trigger == score >= threshold``, ``blank`` set by the first trigger and held) and reads the latency
in clock cycles, measured by the bench and by the wrapper's own counter.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from beamloop.fpga.rtl import RTLDesign


class SimError(RuntimeError):
    """The simulator is missing or the simulation failed (message names which and where the log is)."""


@dataclass
class SimResult:
    """Outcome of one RTL simulation.

    Attributes
    ----------
    samples : int
        Inputs streamed back to back and compared.
    exact : int
        Of those, scores equal to the QONNX output bit for bit.
    bit_exact_fraction : float
    decisions_ok : bool
        ``trigger`` equals ``score >= threshold`` on every output and ``blank`` is the running OR of
        ``trigger`` (no re-arm in the bench).
    latency_cycles : int
        Cycles from ``in_valid`` to ``out_valid`` measured by the bench (same on every spaced sample).
    latency_cycles_hw : int
        The wrapper's ``latency_cycles`` register after the spaced samples.
    cycles : int
        Clock cycles simulated.
    seconds : float
        Wall time of build + run, s.
    simulator : str
    """

    samples: int
    exact: int
    bit_exact_fraction: float
    decisions_ok: bool
    latency_cycles: int
    latency_cycles_hw: int
    cycles: int
    seconds: float
    simulator: str = "icarus"

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def sample_inputs(n: int, n_inputs: int, input_bits: int, seed: int = 0) -> np.ndarray:
    """Integer input vectors for bit-exactness checks: uniform over the input range, plus small values
    (where the ReLUs switch) and rows at the range's ends.

    Returns
    -------
    ndarray, shape (n, n_inputs), int64, in ``[0, 2**input_bits)``.
    """
    rng = np.random.default_rng(seed)
    hi = 1 << input_bits
    x = rng.integers(0, hi, (n, n_inputs))
    q = n // 4
    x[:q] = rng.integers(0, max(hi // 8, 2), (q, n_inputs))
    if n >= 2:
        x[-1] = hi - 1
        x[-2] = 0
    return x.astype(np.int64)


def simulate(design: RTLDesign, x_int: np.ndarray, reference: np.ndarray, out_dir: str | Path, spaced: int = 4,
             progress=print) -> SimResult:
    """Simulate ``design`` on ``x_int`` with Icarus and compare with ``reference``.

    Parameters
    ----------
    design : RTLDesign
        From :func:`beamloop.fpga.rtl.write_rtl`.
    x_int : ndarray, shape (n, n_inputs), integer
        Input words.
    reference : ndarray, shape (n,) or (n, 1), float
        The QONNX graph's outputs on the same inputs.
    out_dir : str or Path
        Build folder (``sim_build/``, ``sim_in.npz``, ``sim_out.npz``, ``sim.log``, ``sim_result.json``).
    spaced : int
        Samples presented one at a time first, for the latency measurement.
    progress : callable

    Returns
    -------
    SimResult

    Raises
    ------
    SimError
        ``iverilog`` missing, or the simulation did not finish.
    ValueError
        Shapes of ``x_int`` and ``reference`` disagree or do not match the design.
    """
    from cocotb_tools.runner import get_runner

    x = np.asarray(x_int, np.int64)
    ref = np.asarray(reference, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[1] != design.n_inputs or len(ref) != len(x):
        raise ValueError(f"inputs {x.shape} / reference {ref.shape} do not match a {design.n_inputs}-input design")
    if shutil.which("iverilog") is None or shutil.which("vvp") is None:
        raise SimError("iverilog/vvp not found on PATH: install Icarus Verilog (apt-get install iverilog)")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sim_in, sim_out = out / "sim_in.npz", out / "sim_out.npz"
    sim_out.unlink(missing_ok=True)
    np.savez(sim_in, x=x, input_bits=design.input_bits, spaced=spaced, timeout=design.latency_cycles + 64)
    t0 = time.perf_counter()
    runner = get_runner("icarus")
    progress(f"icarus: building {design.top} ({len(design.sources)} files)")
    runner.build(sources=design.sources, hdl_toplevel=design.top, build_dir=out / "sim_build", always=True,
                 timescale=("1ns", "1ps"), log_file=out / "build.log")
    progress(f"cocotb: {spaced} spaced + {len(x)} streamed samples")
    env = {"BEAMLOOP_SIM_IN": str(sim_in), "BEAMLOOP_SIM_OUT": str(sim_out),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    runner.test(test_module="beamloop.fpga.cocotb_trigger", hdl_toplevel=design.top, build_dir=out / "sim_build",
                test_dir=out, extra_env=env, log_file=out / "sim.log", results_xml=str(out / "results.xml"))
    if not sim_out.is_file():
        raise SimError(f"the cocotb bench wrote no results (log {out / 'sim.log'})")
    r = np.load(sim_out)
    n_sp = int(r["spaced"])
    score = r["score"][n_sp:]
    trig = r["trigger"]
    blank = r["blank"]
    if len(score) != len(x):
        raise SimError(f"{len(score)} outputs for {len(x)} streamed samples (log {out / 'sim.log'})")
    exact = int(np.sum(score.astype(np.float64) * design.output_step == ref))
    all_scores = r["score"]
    dec_ok = bool(np.array_equal(trig.astype(bool), all_scores >= design.threshold_word)
                  and np.array_equal(blank.astype(bool), np.maximum.accumulate(trig.astype(bool))))
    lat_tb = r["latency_tb"]
    lat_hw = r["latency_hw"]
    if len(lat_tb) and (np.ptp(lat_tb) != 0 or np.ptp(lat_hw) != 0):
        raise SimError(f"latency varies between samples: bench {lat_tb.tolist()}, counter {lat_hw.tolist()}")
    res = SimResult(samples=len(x), exact=exact, bit_exact_fraction=exact / max(len(x), 1), decisions_ok=dec_ok,
                    latency_cycles=int(lat_tb[0]) if len(lat_tb) else 0,
                    latency_cycles_hw=int(lat_hw[-1]) if len(lat_hw) else 0, cycles=int(r["cycles"]),
                    seconds=time.perf_counter() - t0)
    (out / "sim_result.json").write_text(json.dumps(res.as_dict(), indent=1))
    progress(f"cocotb: {exact}/{len(x)} bit-exact, latency {res.latency_cycles} cycles "
             f"(counter {res.latency_cycles_hw}), {res.seconds:.1f} s")
    return res
