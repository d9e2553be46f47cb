"""Cycle-accurate simulation of the trigger IP (cocotb + Icarus Verilog), compared with the integer runtime.

:func:`simulate_stream` streams whole dwells of ADF counts through the IP (:mod:`beamloop.fpga.cocotb_ip`,
bench ``ip_stream``) and compares, sample for sample, with
:meth:`beamloop.edge.trigger.model.ModelTrigger.update_scores` started with the same expected rate: the
same score on every decided sample, the same undecided samples (history not yet full), the same firing
sample in every dwell (the sample on which ``blank`` rises and the ``LAST_TRIGGER_SAMPLE`` register), and
the counters. :func:`simulate_registers` runs the register bench ``ip_registers``.

Streams are given as data (:class:`Dwells`): the tests and benchmarks make them with
:mod:`beamloop.quantize.data` (the simulated microscope's parked-probe physics) and ``beamloop fpga sim``
reads them from a file written by ``beamloop quantize streams``; :func:`synthetic_dwells` is a plain
Poisson stand-in for a quick look without that file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from beamloop.fpga.ip import IPDesign


class SimError(RuntimeError):
    """The simulator is missing or a bench did not finish (message names the log)."""


@dataclass
class Dwells:
    """Dwells of parked-probe counts for the IP.

    Attributes
    ----------
    counts : list of ndarray, shape (n_i,), integer
        Counts per sample of each dwell.
    expected_rate : ndarray, shape (n_dwells,), float64
        Expected counts per sample given at the dwell's start (NaN: none).
    event : ndarray, shape (n_dwells,), int64
        Event sample (-1: none), for the record.
    """

    counts: list
    expected_rate: np.ndarray
    event: np.ndarray

    def __len__(self) -> int:
        """Number of dwells."""
        return len(self.counts)

    @property
    def samples(self) -> int:
        """Samples in all dwells."""
        return int(sum(len(c) for c in self.counts))

    @classmethod
    def load(cls, path: str | Path) -> Dwells:
        """Read a dwell file (:func:`beamloop.quantize.data.save_dwells` writes them: ``counts`` concatenated,
        ``offsets``, ``expected_rate`` (NaN: none), ``event``); raises ``OSError``/``KeyError`` for a missing or
        malformed file."""
        with np.load(path) as z:
            off = z["offsets"]
            counts = [z["counts"][off[k]:off[k + 1]].copy() for k in range(len(off) - 1)]
            return cls(counts, z["expected_rate"].astype(np.float64), z["event"].astype(np.int64))


def synthetic_dwells(n: int, length: int, seed: int = 0) -> Dwells:
    """Poisson dwells with a rate drop: a stand-in for the simulator's dwells (``beamloop quantize streams``)
    when only the logic's arithmetic is of interest.

    Each dwell: rate drawn in ``[4, 12)`` counts per sample with a slow linear trend of up to 10 % over the
    dwell, a drop to 40-70 % of it at a random sample (no drop in one dwell out of five); every other dwell
    is given its first sample's rate as the expected rate.

    Returns
    -------
    Dwells
    """
    rng = np.random.default_rng(seed)
    counts, rates, events = [], [], []
    for k in range(n):
        lam = rng.uniform(4, 12) * (1 + rng.uniform(-0.1, 0.1) * np.arange(length) / length)
        ev = int(rng.integers(0, length)) if rng.random() < 0.8 else -1
        if ev >= 0:
            lam[ev:] *= rng.uniform(0.4, 0.7)
        counts.append(rng.poisson(lam).astype(np.uint16))
        rates.append(float(lam[0]) if k % 2 else np.nan)
        events.append(ev)
    return Dwells(counts, np.array(rates), np.array(events, np.int64))


@dataclass
class StreamSimResult:
    """Outcome of :func:`simulate_stream`.

    Attributes
    ----------
    bus : str
        ``"wb"`` or ``"axil"``: the top simulated.
    dwells, samples : int
        Dwells and samples streamed.
    decided : int
        Samples the runtime decides on (history full).
    exact : int
        Of those, samples whose logic score equals the runtime's.
    decided_flags_equal : bool
        The logic decides on exactly the samples the runtime decides on.
    fire_flags_equal : bool
        ``score_fire`` equals ``score >= threshold`` on every decided sample.
    dwells_fired : int
        Dwells in which the runtime fires.
    firing_sample_equal : int
        Dwells whose firing sample (or no firing) is the same in the logic (``blank`` rising and
        ``LAST_TRIGGER_SAMPLE``) and the runtime.
    counters_ok : bool
        SAMPLE_COUNT equals each dwell's length, TRIGGER_COUNT counts the fired dwells, STATUS reads BLANK
        after a firing and not after the rearm.
    latency_cycles : int
        Measured by the bench on the firing samples (the same on every one), cycles.
    latency_cycles_hw : int
        The LATENCY register (the same on every firing dwell).
    bit_exact_fraction : float
        ``exact / decided``.
    mismatches : list of dict
        Up to 10 differing samples: dwell, sample, logic and runtime scores.
    cycles : int
        Clock cycles simulated.
    seconds : float
        Build and run wall time, s.
    """

    bus: str
    dwells: int
    samples: int
    decided: int
    exact: int
    decided_flags_equal: bool
    fire_flags_equal: bool
    dwells_fired: int
    firing_sample_equal: int
    counters_ok: bool
    latency_cycles: int
    latency_cycles_hw: int
    bit_exact_fraction: float
    mismatches: list = field(default_factory=list)
    cycles: int = 0
    seconds: float = 0.0
    simulator: str = "icarus"

    @property
    def all_exact(self) -> bool:
        """Every score, decision flag, firing sample and counter as the runtime's."""
        return (self.exact == self.decided and self.decided_flags_equal and self.fire_flags_equal
                and self.firing_sample_equal == self.dwells and self.counters_ok)

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return {**asdict(self), "all_exact": self.all_exact}


def _runner_env(sim_in: Path, sim_out: Path) -> dict:
    return {"BEAMLOOP_IP_IN": str(sim_in), "BEAMLOOP_IP_OUT": str(sim_out),
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def _run_bench(design: IPDesign, bus: str, testcase: str, sim_in: Path, out: Path, progress) -> Path:
    """Build the top of ``bus`` with Icarus (once per folder) and run one bench; returns the output file."""
    from cocotb_tools.runner import get_runner

    if shutil.which("iverilog") is None or shutil.which("vvp") is None:
        raise SimError("iverilog/vvp not found on PATH: install Icarus Verilog (apt-get install iverilog)")
    if bus not in ("wb", "axil"):
        raise ValueError(f"bus must be 'wb' or 'axil', got {bus!r}")
    top = design.top_wb if bus == "wb" else design.top_axil
    build = out / f"sim_build_{bus}"
    runner = get_runner("icarus")
    stamp = build / "sources.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == design.sources):
        progress(f"icarus: building {top} ({len(design.sources)} files)")
        runner.build(sources=design.sources, hdl_toplevel=top, build_dir=build, always=True,
                     timescale=("1ns", "1ps"), log_file=out / f"build_{bus}.log")
        stamp.write_text(json.dumps(design.sources))
    sim_out = out / f"{testcase}_{bus}_out.npz"
    sim_out.unlink(missing_ok=True)
    runner.test(test_module="beamloop.fpga.cocotb_ip", hdl_toplevel=top, hdl_toplevel_lang="verilog", build_dir=build,
                test_dir=out,
                testcase=testcase, extra_env=_runner_env(sim_in, sim_out), log_file=out / f"{testcase}_{bus}.log",
                results_xml=str(out / f"{testcase}_{bus}.xml"))
    if not sim_out.is_file():
        raise SimError(f"the cocotb bench {testcase} wrote no results (log {out / f'{testcase}_{bus}.log'})")
    return sim_out


def reference_scores(design: IPDesign, dwells: Dwells, threshold: int, model_dir: Path | None = None):
    """The runtime on the same dwells: per dwell the scores (:data:`~beamloop.edge.trigger.model.NO_SCORE` where
    undecided) and the firing sample (-1: none), from a :class:`~beamloop.edge.trigger.model.ModelTrigger`
    started with each dwell's expected rate."""
    from beamloop.edge.trigger.model import ModelTrigger

    t = ModelTrigger(design.model, threshold=threshold, model_dir=model_dir)
    scores, firsts = [], []
    for counts, rate in zip(dwells.counts, dwells.expected_rate):
        t.start(None if not np.isfinite(rate) else float(rate))
        k, sc = t.update_scores(np.asarray(counts))
        scores.append(sc)
        firsts.append(k)
    return scores, np.array(firsts, np.int64)


def simulate_stream(design: IPDesign, dwells: Dwells, out_dir: str | Path, bus: str = "wb",
                    threshold: int | None = None, model_dir: Path | None = None, progress=print) -> StreamSimResult:
    """Stream ``dwells`` through the IP in Icarus and compare with the integer runtime.

    Parameters
    ----------
    design : IPDesign
        From :func:`beamloop.fpga.ip.write_ip`.
    dwells : Dwells
    out_dir : str or Path
        Build folder (``sim_build_<bus>/``, bench in/out files, logs, ``stream_result_<bus>.json``).
    bus : str
        ``"wb"`` (Wishbone top) or ``"axil"`` (AXI4-Lite top).
    threshold : int, optional
        Score threshold written to THRESHOLD (default the design's reset value).
    model_dir : Path, optional
        Folder of the model's manifest (default the shipped models).
    progress : callable

    Returns
    -------
    StreamSimResult

    Raises
    ------
    SimError
        Icarus missing, or the bench did not finish.
    """
    from beamloop.edge.trigger.model import NO_SCORE, rate_word

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    thr = int(design.threshold if threshold is None else threshold)
    words = np.array([rate_word(float(r)) if np.isfinite(r) else 0 for r in dwells.expected_rate], np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in dwells.counts])]).astype(np.int64)
    counts = np.concatenate([np.minimum(np.asarray(c, np.int64), 65535) for c in dwells.counts]).astype(np.int64)
    sim_in = out / f"ip_stream_{bus}_in.npz"
    np.savez(sim_in, bus=bus, counts=counts, offsets=offsets, rate_words=words, threshold=thr)
    t0 = time.perf_counter()
    progress(f"cocotb: {len(dwells)} dwells, {len(counts)} samples through {bus}")
    r = np.load(_run_bench(design, bus, "ip_stream", sim_in, out, progress))
    ref, first_ref = reference_scores(design, dwells, thr, model_dir)
    if len(r["score"]) != len(counts):
        raise SimError(f"{len(r['score'])} scores for {len(counts)} samples (log {out / f'ip_stream_{bus}.log'})")
    decided_ref = np.concatenate(ref) != NO_SCORE
    ref_all = np.concatenate(ref)
    dec = r["decided"].astype(bool)
    same = (r["score"] == ref_all) & decided_ref
    exact = int(np.count_nonzero(same))
    fire_ok = bool(np.array_equal(r["fire"].astype(bool), dec & (r["score"] >= thr)))
    mism = []
    for i in np.flatnonzero(decided_ref & ~same)[:10]:
        k = int(np.searchsorted(offsets, i, side="right") - 1)
        mism.append({"dwell": k, "sample": int(i - offsets[k]), "logic": int(r["score"][i]),
                     "runtime": int(ref_all[i])})
    blank = r["blank"].astype(bool)
    first_logic = []
    for k in range(len(dwells)):
        b = np.flatnonzero(blank[offsets[k]:offsets[k + 1]])
        first_logic.append(int(b[0]) if len(b) else -1)
    first_logic = np.array(first_logic, np.int64)
    last = np.where(r["last_trigger_sample"] == 0xFFFFFFFF, -1, r["last_trigger_sample"])
    fs_equal = int(np.count_nonzero((first_logic == first_ref) & (last == first_ref)))
    fired = first_ref >= 0
    counters_ok = bool(np.array_equal(r["sample_count"], np.diff(offsets))
                       and np.array_equal(r["trigger_count"], np.cumsum(fired))
                       and np.array_equal(r["status"] & 1, fired.astype(np.int64))
                       and not np.any(r["status_after_rearm"] & 1))
    lat_tb = r["latency_tb"][fired]
    lat_hw = r["latency"][fired]
    if len(lat_tb) and (np.ptp(lat_tb) or np.ptp(lat_hw)):
        raise SimError(f"latency varies between dwells: bench {sorted(set(lat_tb.tolist()))}, "
                       f"register {sorted(set(lat_hw.tolist()))}")
    res = StreamSimResult(bus=bus, dwells=len(dwells), samples=int(len(counts)), decided=int(decided_ref.sum()),
                          exact=exact, decided_flags_equal=bool(np.array_equal(dec, decided_ref)),
                          fire_flags_equal=fire_ok, dwells_fired=int(fired.sum()), firing_sample_equal=fs_equal,
                          counters_ok=counters_ok, latency_cycles=int(lat_tb[0]) if len(lat_tb) else 0,
                          latency_cycles_hw=int(lat_hw[0]) if len(lat_hw) else 0,
                          bit_exact_fraction=exact / max(int(decided_ref.sum()), 1), mismatches=mism,
                          cycles=int(r["cycles"]), seconds=time.perf_counter() - t0)
    (out / f"stream_result_{bus}.json").write_text(json.dumps(res.as_dict(), indent=1))
    progress(f"cocotb: {exact}/{res.decided} decided samples bit-exact, firing sample equal in {fs_equal}/"
             f"{len(dwells)} dwells ({res.dwells_fired} fired), latency {res.latency_cycles} cycles (register "
             f"{res.latency_cycles_hw}), {res.seconds:.0f} s")
    return res


def simulate_registers(design: IPDesign, out_dir: str | Path, bus: str = "wb", samples: np.ndarray | None = None,
                       rate: float = 7.5, progress=print) -> dict:
    """Run the register bench (:mod:`beamloop.fpga.cocotb_ip`, ``ip_registers``) on one top.

    Parameters
    ----------
    design : IPDesign
    out_dir : str or Path
    bus : str
        ``"wb"`` or ``"axil"``.
    samples : ndarray, optional
        14 counts streamed by the bench (default Poisson at ``rate``, seed 0).
    rate : float
        Expected rate written before the first START (counts per sample).
    progress : callable

    Returns
    -------
    dict
        Read-back name -> value (see the bench), plus ``scores`` (list of [score, decided, fire, blank]).
    """
    from beamloop.edge.trigger.model import rate_word

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).poisson(rate, 14) if samples is None else np.asarray(samples)
    sim_in = out / f"ip_registers_{bus}_in.npz"
    np.savez(sim_in, bus=bus, samples=x.astype(np.int64), rate_word=rate_word(rate))
    r = np.load(_run_bench(design, bus, "ip_registers", sim_in, out, progress))
    res = {str(k): int(v) for k, v in zip(r["names"], r["values"])}
    res["scores"] = np.stack([r["score"], r["decided"], r["fire"], r["blank"]], 1).tolist()
    res["samples"] = x.astype(int).tolist()
    return res
