"""The automated search (``beamloop search``): montage, few-shot chips, drive to the rare regions, zoom in.

The workflow of PNNL's AutoEM (M. J. Olszta et al., "An automated scanning transmission electron microscope
guided by sparse data analytics", Microsc. Microanal. 28, 1611-1621 (2022)) on the simulated large specimen
(:mod:`beamloop.edge.sim.specimen`), through the control bridge and the frame stream as on a microscope:

1. **Montage**: low-magnification frames (``overview_fov_nm``) on a grid covering the stage's travel range,
   one stage move each (the stage controller blanks the beam while it moves and refuses frames until it has
   settled).
2. **Chips**: every montage frame is tiled into chips and classified few-shot
   (:mod:`beamloop.edge.analysis.fewshot`: the shipped ONNX encoder, prototypes of ``shots`` support chips
   per class). The support chips are given as a file, or chosen from the montage by a stand-in for the
   person: ``shots`` chips per class, picked from the simulator's ground truth (as a person clicking
   examples), with no retraining.
3. **Rank**: chips whose most likely class is a target class (:data:`beamloop.edge.sim.specimen.RARE_CLASSES`
   by default) are grouped into regions (8-connected on the chip grid); regions are ranked by their highest
   class probability, then size.
4. **Visit**: the rest of the stage-move budget drives to the best regions in turn and scans each at high
   magnification (``zoom_fov_nm``), skipping regions inside a view already taken; when the regions run out,
   single chips follow in order of their summed target-class probability (:func:`candidate_chips`).
5. **Hand over** (``handover``): the best region is handed to the atom-scale vacancy-line experiment
   (:func:`beamloop.edge.experiments.closed_loop.run`, its simulated microscope standing in for that area).

Baselines with the same stage-move budget: ``raster`` (high-magnification frames on a serpentine grid from
a corner of the travel range) and ``random`` (uniformly random positions). A frame "finds" a rare region when
the region's centre lies in its inner 80 % (ground truth of the simulator). Time is simulated
(:class:`beamloop.edge.sim.specimen.ManualClock`): stage moves and frames take the seconds they would, and the
run does not wait for them.

Outputs in ``out``: ``report.json`` (a ``search`` section: rare regions per move of each strategy,
``ratio_vs_raster``, time to the first rare region), ``run.h5`` (every stage move, frame and chip decision;
:func:`write_run_file`), ``report.html`` (the morning report: ranked regions with thumbnails of their zoomed
frames) and ``montage.png``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from beamloop.edge.analysis.fewshot import ChipEncoder, ChipMap, PrototypeClassifier, SupportSet, classify_frame
from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.io.imageio import ImageReadError, read_image
from beamloop.edge.io.runlog import RunLogError, write_text_file
from beamloop.edge.sim.specimen import RARE_CLASSES, REGION_CLASSES, ManualClock, SearchMicroscope, SpecimenConfig
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent

STRATEGIES = ("search", "raster", "random")
"""Ways to spend the stage-move budget."""

STOP_REASONS = ("controller_lost", "no_frames", "refused", "interrupted")
"""Why a search stops early (``outcome.reason``)."""


class SearchStopped(RuntimeError):
    """The search stopped before its budget was spent.

    Parameters
    ----------
    reason : str
        One of :data:`STOP_REASONS`.
    message : str
    signum : int
        The signal that stopped it (``interrupted``), else 0.
    """

    def __init__(self, reason: str, message: str, signum: int = 0) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.signum = reason, message, signum


@dataclass(frozen=True)
class SearchConfig:
    """Options of a search run.

    Attributes
    ----------
    budget_moves : int
        Stage moves allowed (montage moves count).
    overview_fov_nm, zoom_fov_nm : float
        Fields of view of montage and zoomed frames, nanometres.
    overview_px, zoom_px : int
        Their sizes, pixels a side.
    dwell_us : float
        Pixel dwell, microseconds.
    chip_px : int
        Chip side in montage pixels.
    shots : int
        Support chips per class (1-5) when the support is picked from ground truth.
    targets : tuple of str
        Classes searched for.
    min_confidence : float
        Smallest class probability of a chip counted as a target.

    Raises
    ------
    ValueError
        An option outside its range (one line naming it).
    """

    budget_moves: int = 20
    overview_fov_nm: float = 4000.0
    zoom_fov_nm: float = 600.0
    overview_px: int = 1024
    zoom_px: int = 256
    dwell_us: float = 1.0
    chip_px: int = 32
    shots: int = 2
    targets: tuple[str, ...] = RARE_CLASSES
    min_confidence: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.budget_moves, int) and 1 <= self.budget_moves <= 10_000):
            raise ValueError(f"--budget-moves {self.budget_moves!r} must be a whole number in [1, 10000]")
        for name in ("overview_fov_nm", "zoom_fov_nm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 10 <= v <= 1e5):
                raise ValueError(f"{name} {v!r} must be a number of nanometres in [10, 100000]")
        for name in ("overview_px", "zoom_px"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 16 <= v <= 4096):
                raise ValueError(f"{name} {v!r} must be a whole number of pixels in [16, 4096]")
        if not (isinstance(self.chip_px, int) and 8 <= self.chip_px <= self.overview_px):
            raise ValueError(f"--chip-px {self.chip_px!r} must be a whole number in [8, {self.overview_px}]")
        if not (isinstance(self.shots, int) and 1 <= self.shots <= 5):
            raise ValueError(f"--shots {self.shots!r} must be a whole number in [1, 5]")
        if not (math.isfinite(self.dwell_us) and 0.05 <= self.dwell_us <= 100):
            raise ValueError(f"--dwell-us {self.dwell_us!r} must be in [0.05, 100] us")
        bad = [t for t in self.targets if t not in REGION_CLASSES]
        if not self.targets or bad:
            raise ValueError(f"--targets {list(self.targets)} must name classes of {list(REGION_CLASSES)}")
        if not (0 <= self.min_confidence < 1):
            raise ValueError(f"--min-confidence {self.min_confidence!r} must be in [0, 1)")


@dataclass
class Region:
    """A candidate region of the montage.

    Attributes
    ----------
    rank : int
        1 = best (after ranking).
    cls : str
        Its most common predicted class.
    score : float
        Highest class probability of its chips.
    chips : int
    x_um, y_um : float
        Probability-weighted centre on the stage, micrometres.
    frame_id : int
        Montage frame it was found in.
    visited : bool
    found : list of int
        Ground-truth rare regions in its zoomed frame.
    zoom_frame_id : int or None
    thumbnail : ndarray or None
        Its zoomed frame (uint8, reduced).
    """

    rank: int
    cls: str
    score: float
    chips: int
    x_um: float
    y_um: float
    frame_id: int
    visited: bool = False
    found: list[int] = field(default_factory=list)
    zoom_frame_id: int | None = None
    thumbnail: np.ndarray | None = None


class _Session:
    """One run on one simulated microscope: bridge, frame stream, simulated clock, records."""

    def __init__(self, spec: SpecimenConfig, interrupt: Callable[[], int] | None) -> None:
        self.clock = ManualClock(0.0)
        self.mic = SearchMicroscope(spec, clock=self.clock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.mic.serve, kwargs={"stop": self._stop.is_set}, daemon=True)
        self._thread.start()
        self.rx = FrameReceiver(self.mic.frames_endpoint, ring=4, max_ring_bytes=1 << 28)
        self.bridge = BridgeClient(self.mic.control_endpoint, timeout_ms=20000)
        self.caps = self.bridge.get_capabilities()
        self.interrupt = interrupt
        self.moves: list[dict] = []
        self.frames: list[dict] = []
        self.first_rare_s: float | None = None
        self.found: set[int] = set()

    def close(self) -> None:
        try:
            self.bridge.stop()
        except BridgeError:
            pass
        self.bridge.close()
        self.rx.close()
        self._stop.set()
        self._thread.join(timeout=5)
        self.mic.close()

    def check_interrupt(self) -> None:
        sig = self.interrupt() if self.interrupt is not None else 0
        if sig:
            raise SearchStopped("interrupted", f"stopped by signal {sig}", sig)

    def move(self, x_um: float, y_um: float, purpose: str) -> dict:
        """Stage move (clipped to the travel range); the clock advances by its duration."""
        self.check_interrupt()
        lim = self.caps["stage"]
        x = float(np.clip(x_um, *lim["x_um"]))
        y = float(np.clip(y_um, *lim["y_um"]))
        t = self.clock()
        try:
            res = self.bridge.move_stage(x, y)
        except BridgeError as exc:
            raise SearchStopped("refused" if exc.code != "timeout" else "controller_lost", str(exc)) from None
        self.clock.advance(res["duration_s"])
        rec = {"t_s": t, "target_um": [x, y], "applied_um": [res["applied"]["x_um"], res["applied"]["y_um"]],
               "duration_s": res["duration_s"], "purpose": purpose, "blanked": res["blanked"]}
        self.moves.append(rec)
        return rec

    def frame(self, fov_nm: float, px: int, dwell_us: float, kind: str) -> dict:
        """Acquire a frame at the stage position; the clock advances by its scan time; ground truth attached."""
        self.check_interrupt()
        try:
            scan = self.bridge.acquire_frame((px, px), (fov_nm, fov_nm), dwell_us)
        except BridgeError as exc:
            raise SearchStopped("refused" if exc.code != "timeout" else "controller_lost", str(exc)) from None
        t_end = time.monotonic() + 30.0
        image = None
        while time.monotonic() < t_end:
            ev = self.rx.recv(200)
            if isinstance(ev, ImageEvent) and ev.header.user_data.get("frame_id") == scan.frame_id:
                image = np.array(ev.data["haadf"], copy=True)
                break
        if image is None:
            raise SearchStopped("no_frames", f"frame {scan.frame_id} did not arrive within 30 s")
        t0 = self.clock()
        self.clock.advance(px * px * dwell_us * 1e-6)
        truth = self.bridge.call("sim_frame_truth", frame_id=scan.frame_id)
        rec = {"frame_id": scan.frame_id, "kind": kind, "t_s": t0, "fov_nm": fov_nm, "shape": [px, px],
               "stage_um": list(self.moves[-1]["applied_um"]) if self.moves else [0.0, 0.0], "image": image,
               "true_center_nm": truth["center_nm"], "rare": list(truth["rare"]),
               "labels": np.frombuffer(truth["labels"], np.uint8).reshape(px, px)}
        self.frames.append(rec)
        if kind == "zoom" and rec["rare"]:
            if self.first_rare_s is None:
                self.first_rare_s = self.clock()
            self.found.update(rec["rare"])
        return rec


def montage_grid(stage: dict, fov_nm: float) -> list[tuple[float, float]]:
    """Stage positions (um) of frames of ``fov_nm`` that tile the travel range, serpentine order.

    Parameters
    ----------
    stage : dict
        ``get_capabilities``' ``stage`` entry (``x_um``, ``y_um`` ranges).
    fov_nm : float

    Returns
    -------
    list of (x_um, y_um)
    """
    f = fov_nm / 1000.0
    out = []
    (x0, x1), (y0, y1) = stage["x_um"], stage["y_um"]
    nx, ny = max(1, math.ceil((x1 - x0) / f - 1e-9)), max(1, math.ceil((y1 - y0) / f - 1e-9))
    for i in range(ny):
        cols = range(nx) if i % 2 == 0 else range(nx - 1, -1, -1)
        for j in cols:
            out.append((float(np.clip(x0 + (j + 0.5) * f, x0, x1)), float(np.clip(y0 + (i + 0.5) * f, y0, y1))))
    return out


def pick_support(frames: list[dict], chip_px: int, shots: int, rng: np.random.Generator,
                 purity: float = 0.9) -> SupportSet:
    """The stand-in for a person clicking examples: ``shots`` chips per class present in the montage, chosen
    at random among chips whose ground truth is at least ``purity`` one class.

    Parameters
    ----------
    frames : list of dict
        Montage frames (``image``, ``labels``, ``frame_id``).
    chip_px, shots : int
    rng : numpy.random.Generator
    purity : float

    Returns
    -------
    SupportSet
        Chips named ``frame<id>`` by their frame.
    """
    cand: dict[str, list[tuple[str, int, int]]] = {}
    for f in frames:
        lab = f["labels"]
        n_r, n_c = lab.shape[0] // chip_px, lab.shape[1] // chip_px
        blocks = lab[:n_r * chip_px, :n_c * chip_px].reshape(n_r, chip_px, n_c, chip_px).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(n_r * n_c, -1)
        for v, name in enumerate(REGION_CLASSES):
            frac = (blocks == v).mean(axis=1)
            for k in np.flatnonzero(frac >= purity):
                cand.setdefault(name, []).append((f"frame{f['frame_id']}", int(k // n_c) * chip_px,
                                                  int(k % n_c) * chip_px))
    s = SupportSet(chip_px)
    for name, items in cand.items():
        for k in rng.permutation(len(items))[:shots]:
            s.add(name, *items[int(k)])
    return s


def find_regions(maps: list[tuple[dict, ChipMap]], targets: tuple[str, ...], min_conf: float) -> list[Region]:
    """Group target chips of each montage frame into 8-connected regions and rank them.

    Parameters
    ----------
    maps : list of (frame record, ChipMap)
    targets : tuple of str
    min_conf : float

    Returns
    -------
    list of Region
        Best first (highest probability, then most chips), ranks 1, 2, ...
    """
    regions: list[Region] = []
    for f, cm in maps:
        tk = [cm.classes.index(t) for t in targets if t in cm.classes]
        if not tk:
            continue
        mask = np.isin(cm.labels, tk) & (cm.confidence >= min_conf)
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        px_nm = f["fov_nm"] / f["shape"][1]
        sx, sy = f["stage_um"]
        for r in range(1, n + 1):
            ii, jj = np.nonzero(lab == r)
            w = cm.confidence[ii, jj]
            cy = (np.average(ii, weights=w) + 0.5) * cm.chip_px
            cx = (np.average(jj, weights=w) + 0.5) * cm.chip_px
            cls_k = np.bincount(cm.labels[ii, jj]).argmax()
            regions.append(Region(0, cm.classes[int(cls_k)], float(w.max()), len(ii),
                                  float(sx + (cx - f["shape"][1] / 2) * px_nm / 1000),
                                  float(sy + (cy - f["shape"][0] / 2) * px_nm / 1000), f["frame_id"]))
    regions.sort(key=lambda q: (-q.score, -q.chips))
    for k, q in enumerate(regions):
        q.rank = k + 1
    return regions


def candidate_chips(maps: list[tuple[dict, ChipMap]], targets: tuple[str, ...], limit: int = 200) -> list[Region]:
    """Single chips ranked by their summed target-class probability, as candidates after the regions run out.

    Returns
    -------
    list of Region
        At most ``limit``, class ``"uncertain"``, ``score`` the summed probability; ranks left 0.
    """
    out: list[Region] = []
    for f, cm in maps:
        tk = [cm.classes.index(t) for t in targets if t in cm.classes]
        if not tk:
            continue
        p = cm.proba[..., tk].sum(axis=-1)
        px_nm = f["fov_nm"] / f["shape"][1]
        sx, sy = f["stage_um"]
        for k in np.argsort(p, axis=None)[::-1][:limit]:
            i, j = divmod(int(k), p.shape[1])
            out.append(Region(0, "uncertain", float(p[i, j]), 1,
                              sx + ((j + 0.5) * cm.chip_px - f["shape"][1] / 2) * px_nm / 1000,
                              sy + ((i + 0.5) * cm.chip_px - f["shape"][0] / 2) * px_nm / 1000, f["frame_id"]))
    out.sort(key=lambda q: -q.score)
    return out[:limit]


def _thumb(image: np.ndarray, size: int = 128) -> np.ndarray:
    """uint8 thumbnail (percentile-scaled, block-reduced)."""
    k = max(image.shape[0] // size, 1)
    a = image[:image.shape[0] // k * k, :image.shape[1] // k * k].astype(np.float32)
    a = a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).mean(axis=(1, 3))
    lo, hi = np.percentile(a, [1, 99.5])
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def run_strategy(strategy: str, cfg: SearchConfig, *, seed: int = 0, spec: SpecimenConfig | None = None,
                 support: SupportSet | None = None, support_images: dict | None = None,
                 encoder: ChipEncoder | None = None, interrupt: Callable[[], int] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Spend the stage-move budget one way on a fresh simulated microscope; returns what happened.

    Parameters
    ----------
    strategy : {"search", "raster", "random"}
    cfg : SearchConfig
    seed : int
        Specimen seed (and of the random baseline and the support picks).
    spec : SpecimenConfig, optional
        The specimen (default: ``SpecimenConfig(seed=seed)``).
    support, support_images : SupportSet, dict, optional
        Support chips and the images they name (``search``); default: picked from the montage
        (:func:`pick_support`).
    encoder : ChipEncoder, optional
        Default: the shipped one.
    interrupt : callable() -> int, optional
        A non-zero signal number stops the run (:class:`SearchStopped`).
    progress : callable(str), optional

    Returns
    -------
    dict
        ``strategy``, ``moves`` (list), ``frames`` (list of records with images), ``regions`` (search),
        ``maps``, ``support``, ``rare_found``, ``rare_total``, ``moves_used``, ``rare_per_move``,
        ``time_to_first_rare_s`` (None when none found), ``sim_time_s``, ``stopped`` (None or SearchStopped).

    Raises
    ------
    ValueError
        ``strategy`` unknown, or the montage alone needs more moves than the budget.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r} must be one of {', '.join(STRATEGIES)}")
    spec = spec or SpecimenConfig(seed=seed)
    rng = np.random.default_rng([seed, 0x5EA])
    s = _Session(spec, interrupt)
    say = progress or (lambda text: None)
    out: dict = {"strategy": strategy, "regions": [], "maps": [], "support": None, "stopped": None,
                 "chips_per_s": None}
    try:
        stage = s.caps["stage"]
        try:
            if strategy == "search":
                grid = montage_grid(stage, cfg.overview_fov_nm)
                if len(grid) >= cfg.budget_moves:
                    raise ValueError(f"the montage needs {len(grid)} stage moves, the budget is {cfg.budget_moves}: "
                                     "raise --budget-moves or the overview field of view")
                montage = []
                for k, (x, y) in enumerate(grid):
                    s.move(x, y, "montage")
                    montage.append(s.frame(cfg.overview_fov_nm, cfg.overview_px, cfg.dwell_us, "overview"))
                    say(f"montage {k + 1}/{len(grid)}")
                enc = encoder or ChipEncoder()
                if support is None:
                    support = pick_support(montage, cfg.chip_px, cfg.shots, rng)
                    support_images = {f"frame{f['frame_id']}": f["image"] for f in montage}
                clf: PrototypeClassifier = support.embed(enc, support_images or {})
                t0 = time.perf_counter()
                maps = [(f, classify_frame(f["image"], clf, enc, support.chip_px)) for f in montage]
                dt = time.perf_counter() - t0
                out["chips_per_s"] = sum(m.labels.size for _, m in maps) / max(dt, 1e-9)
                out["maps"], out["support"] = maps, support
                regions = find_regions(maps, cfg.targets, cfg.min_confidence)
                out["regions"] = regions
                say(f"{len(regions)} candidate regions")
                visited: list[tuple[float, float]] = []
                half = cfg.zoom_fov_nm / 2000.0 * 0.8
                fallback = candidate_chips(maps, cfg.targets)
                for q in [*regions, *fallback]:
                    if len(s.moves) >= cfg.budget_moves:
                        break
                    if any(abs(q.x_um - vx) < half and abs(q.y_um - vy) < half for vx, vy in visited):
                        continue
                    if q.rank == 0:  # a single uncertain chip: it joins the ranking when visited
                        q.rank = len(regions) + 1
                        regions.append(q)
                    s.move(q.x_um, q.y_um, f"region {q.rank}")
                    z = s.frame(cfg.zoom_fov_nm, cfg.zoom_px, cfg.dwell_us, "zoom")
                    q.visited, q.found, q.zoom_frame_id = True, z["rare"], z["frame_id"]
                    q.thumbnail = _thumb(z["image"])
                    visited.append((q.x_um, q.y_um))
                    say(f"region {q.rank}: {len(z['rare'])} rare")
            elif strategy == "raster":
                for x, y in montage_grid(stage, cfg.zoom_fov_nm)[:cfg.budget_moves]:
                    s.move(x, y, "raster")
                    s.frame(cfg.zoom_fov_nm, cfg.zoom_px, cfg.dwell_us, "zoom")
            else:
                (x0, x1), (y0, y1) = stage["x_um"], stage["y_um"]
                for _ in range(cfg.budget_moves):
                    s.move(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), "random")
                    s.frame(cfg.zoom_fov_nm, cfg.zoom_px, cfg.dwell_us, "zoom")
        except SearchStopped as exc:
            out["stopped"] = exc
        out["events"] = [e for e in s.mic.events if e.get("type") == "stage_move"]
        out["safety"] = s.bridge.get_state().get("safety", {}) if out["stopped"] is None else {}
    finally:
        s.close()
    n = len(s.moves)
    out.update(moves=s.moves, frames=s.frames, rare_found=sorted(s.found), rare_total=len(s.mic.backend.specimen.rare),
               moves_used=n, rare_per_move=len(s.found) / max(n, 1), time_to_first_rare_s=s.first_rare_s,
               sim_time_s=s.clock())
    return out


def summarize(res: dict) -> dict:
    """The JSON part of a :func:`run_strategy` result."""
    return {"strategy": res["strategy"], "moves_used": res["moves_used"], "rare_found": len(res["rare_found"]),
            "rare_ids": res["rare_found"], "rare_total": res["rare_total"], "rare_per_move": res["rare_per_move"],
            "time_to_first_rare_s": res["time_to_first_rare_s"], "sim_time_s": res["sim_time_s"],
            "frames": len(res["frames"]), "chips_per_s": res.get("chips_per_s")}


def write_run_file(path: Path, results: list[dict], config: dict) -> None:
    """``run.h5``: per strategy a group with ``stage_moves`` (t_s, target and applied x/y um, duration_s,
    purpose), ``frames/<frame_id>/image`` (gzip; attrs kind, t_s, stage_um, fov_nm, true_center_nm, rare),
    ``chips`` (frame_id, row, col, x_um, y_um, class, confidence: every chip decision) and ``regions`` (the
    ranking). Root attrs: ``config`` (JSON), ``classes``.

    Raises
    ------
    RunLogError
        The file cannot be written (naming it).
    """
    import h5py

    tmp = path.with_name(path.name + ".part")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["config"] = json.dumps(config)
            h5.attrs["classes"] = json.dumps(list(REGION_CLASSES))
            for res in results:
                g = h5.create_group(res["strategy"])
                mv = np.array([(m["t_s"], *m["target_um"], *m["applied_um"], m["duration_s"], m["purpose"])
                               for m in res["moves"]],
                              dtype=[("t_s", "f8"), ("target_x_um", "f8"), ("target_y_um", "f8"),
                                     ("applied_x_um", "f8"), ("applied_y_um", "f8"), ("duration_s", "f8"),
                                     ("purpose", "S32")])
                g.create_dataset("stage_moves", data=mv)
                fg = g.create_group("frames")
                for f in res["frames"]:
                    d = fg.create_dataset(str(f["frame_id"]), data=f["image"], compression="gzip", compression_opts=1)
                    for k in ("kind", "t_s", "fov_nm"):
                        d.attrs[k] = f[k]
                    d.attrs["stage_um"] = f["stage_um"]
                    d.attrs["true_center_nm"] = f["true_center_nm"]
                    d.attrs["rare"] = json.dumps(f["rare"])
                rows = []
                for f, cm in res["maps"]:
                    px_nm = f["fov_nm"] / f["shape"][1]
                    for i in range(cm.labels.shape[0]):
                        for j in range(cm.labels.shape[1]):
                            x = f["stage_um"][0] + ((j + 0.5) * cm.chip_px - f["shape"][1] / 2) * px_nm / 1000
                            y = f["stage_um"][1] + ((i + 0.5) * cm.chip_px - f["shape"][0] / 2) * px_nm / 1000
                            rows.append((f["frame_id"], i * cm.chip_px, j * cm.chip_px, x, y,
                                         cm.classes[int(cm.labels[i, j])], float(cm.confidence[i, j])))
                g.create_dataset("chips", data=np.array(rows, dtype=[
                    ("frame_id", "i8"), ("row", "i4"), ("col", "i4"), ("x_um", "f8"), ("y_um", "f8"),
                    ("class", "S24"), ("confidence", "f4")]))
                g.create_dataset("regions", data=np.array(
                    [(q.rank, q.cls, q.score, q.chips, q.x_um, q.y_um, q.visited, len(q.found))
                     for q in res["regions"]],
                    dtype=[("rank", "i4"), ("class", "S24"), ("score", "f4"), ("chips", "i4"), ("x_um", "f8"),
                           ("y_um", "f8"), ("visited", "?"), ("rare_found", "i4")]))
                g.attrs["summary"] = json.dumps(summarize(res), default=float)
        tmp.replace(path)
    except OSError as exc:
        raise RunLogError(exc.errno or 5, f"{path}: {exc}") from None


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_montage(path: Path, res: dict, targets: tuple[str, ...]) -> None:
    """``montage.png``: the montage frames with the target chips outlined and the visited regions numbered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(8, 8))
    for f, cm in res["maps"]:
        w_um = f["fov_nm"] / 1000
        sx, sy = f["stage_um"]
        ext = (sx - w_um / 2, sx + w_um / 2, sy + w_um / 2, sy - w_um / 2)
        ax.imshow(_thumb(f["image"], 256), cmap="gray", extent=ext)
        c_um = cm.chip_px * w_um / f["shape"][1]
        tk = [cm.classes.index(t) for t in targets if t in cm.classes]
        for i, j in zip(*np.nonzero(np.isin(cm.labels, tk))):
            ax.add_patch(Rectangle((ext[0] + j * c_um, ext[3] + i * c_um), c_um, c_um, fill=False, ec="m", lw=0.6))
    for q in res["regions"]:
        if q.visited:
            ax.text(q.x_um, q.y_um, str(q.rank), color="yellow" if q.found else "cyan", fontsize=8, ha="center")
    ax.set_xlabel("stage x (um)")
    ax.set_ylabel("stage y (um)")
    ax.set_title("montage: target chips (magenta), visited regions (yellow: rare region found)")
    ax.autoscale()
    ax.invert_yaxis() if ax.get_ylim()[0] < ax.get_ylim()[1] else None
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_html(path: Path, report: dict, res: dict) -> None:
    """The morning report: the comparison table, the montage and the ranked regions with thumbnails."""
    rows = []
    for k, v in report["search"]["strategies"].items():
        first = "-" if v["time_to_first_rare_s"] is None else f"{v['time_to_first_rare_s']:.0f}"
        rows.append(f"<tr><td>{html.escape(k)}</td><td>{v['moves_used']}</td><td>{v['rare_found']}</td>"
                    f"<td>{v['rare_per_move']:.3f}</td><td>{first}</td></tr>")
    regions = []
    for q in res["regions"][:30]:
        img = f'<img src="data:image/png;base64,{_png_b64(q.thumbnail)}">' if q.thumbnail is not None else ""
        regions.append(f"<tr><td>{q.rank}</td><td>{html.escape(q.cls)}</td><td>{q.score:.3f}</td><td>{q.chips}</td>"
                       f"<td>({q.x_um:.2f}, {q.y_um:.2f})</td><td>{'yes' if q.visited else 'no'}</td>"
                       f"<td>{len(q.found)}</td><td>{img}</td></tr>")
    montage = ""
    mp = path.parent / "montage.png"
    if mp.is_file():
        montage = f'<img src="data:image/png;base64,{base64.b64encode(mp.read_bytes()).decode("ascii")}" width="640">'
    s = report["search"]
    ratio = "n/a" if s["ratio_vs_raster"] is None else f"{s['ratio_vs_raster']:.2f}x"
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>beamloop search report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}</style>
</head><body><h1>Automated search: morning report</h1>
<p>Specimen seed {report['config']['seed']}, budget {report['config']['budget_moves']} stage moves; rare regions per
move relative to raster: <b>{ratio}</b>; outcome: {html.escape(str(report['outcome']['reason'] or 'complete'))}.</p>
<table><tr><th>strategy</th><th>moves</th><th>rare regions found</th><th>per move</th><th>time to first (s)</th></tr>
{''.join(rows)}</table><h2>Montage</h2>{montage}<h2>Ranked regions</h2>
<table><tr><th>rank</th><th>class</th><th>score</th><th>chips</th><th>stage (um)</th><th>visited</th><th>rare found</th>
<th>zoomed frame</th></tr>{''.join(regions)}</table></body></html>"""
    write_text_file(path, text)


def run(out: Path, *, seed: int = 0, budget_moves: int = 20, strategy: str = "search", quiet: bool = False,
        interrupt: Callable[[], int] | None = None, compare: bool = True, shots: int = 2,
        support: Path | None = None, handover: bool = False, **options) -> dict:
    """Run the search (and, with ``compare``, the raster and random baselines at the same budget).

    Parameters
    ----------
    out : Path
        Output folder (created): ``report.json``, ``run.h5``, ``report.html``, ``montage.png``.
    seed : int
        Specimen seed.
    budget_moves : int
        Stage moves per strategy.
    strategy : {"search", "raster", "random"}
        The strategy run (the others too with ``compare``).
    quiet : bool
        Print nothing.
    interrupt : callable() -> int, optional
        Asked between steps; a non-zero signal number stops the run cleanly (``outcome.reason`` ``interrupted``).
    compare : bool
        Also run the other strategies.
    shots : int
        Support chips per class picked from the montage (without ``support``).
    support : Path, optional
        A support set JSON (:class:`beamloop.edge.analysis.fewshot.SupportSet`) whose images are ``.npy`` or
        image files, by path.
    handover : bool
        Hand the best found region to the vacancy-line experiment (``out/handover``).
    **options
        Further :class:`SearchConfig` fields (``overview_fov_nm``, ``zoom_fov_nm``, ``chip_px``, ...).

    Returns
    -------
    dict
        The report: ``config``, ``outcome`` (``complete``, ``reason``, ``message``, ``signum``,
        ``output_errors``), ``search`` (``strategies`` with each one's summary, ``ratio_vs_raster``,
        ``ratio_vs_random``, ``regions`` ranked), ``handover``.

    Raises
    ------
    ValueError
        An option outside its range, before anything starts.
    """
    out = Path(out)
    cfg = SearchConfig(budget_moves=budget_moves, shots=shots, **options)
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r} must be one of {', '.join(STRATEGIES)}")
    sup = sup_images = None
    if support is not None:
        sup = SupportSet.from_json(Path(support).read_text())
        sup_images = {}
        for items in sup.chips.values():
            for name, _, _ in items:
                if name not in sup_images:
                    sup_images[name] = load_image(name)
    out.mkdir(parents=True, exist_ok=True)
    order = [strategy] + ([s for s in STRATEGIES if s != strategy] if compare else [])
    outcome: dict = {"complete": False, "reason": "", "message": "", "signum": 0, "output_errors": []}
    results = []
    for name in order:
        if not quiet:
            print(f"search: strategy {name}, budget {budget_moves} stage moves")
        res = run_strategy(name, cfg, seed=seed, support=sup if name == "search" else None,
                           support_images=sup_images, interrupt=interrupt,
                           progress=None if quiet else (lambda t, n=name: print(f"  {n}: {t}")))
        results.append(res)
        if res["stopped"] is not None:
            exc = res["stopped"]
            outcome.update(reason=exc.reason, message=exc.message, signum=exc.signum)
            break
    else:
        outcome["complete"] = True
    strategies = {r["strategy"]: summarize(r) for r in results}

    def ratio(a: str, b: str) -> float | None:
        if a not in strategies or b not in strategies:
            return None
        rb = strategies[b]["rare_per_move"]
        # no rare region found by the baseline: compare with half a region over its moves (a floor, noted)
        rb = rb if rb > 0 else 0.5 / max(strategies[b]["moves_used"], 1)
        return strategies[a]["rare_per_move"] / rb

    main = results[0]
    report = {
        "config": {"seed": seed, "budget_moves": budget_moves, "strategy": strategy, "compare": compare,
                   "shots": shots, "support": None if support is None else str(support),
                   **{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}},
        "outcome": outcome,
        "search": {"strategies": strategies, "ratio_vs_raster": ratio("search", "raster"),
                   "ratio_vs_random": ratio("search", "random"),
                   "ratio_note": "rare regions per stage move relative to the baseline; a baseline that found none "
                                 "counts as half a region",
                   "regions": [{"rank": q.rank, "class": q.cls, "score": q.score, "chips": q.chips, "x_um": q.x_um,
                                "y_um": q.y_um, "visited": q.visited, "rare_found": q.found}
                               for q in main["regions"][:100]],
                   "support": None if main["support"] is None else json.loads(main["support"].to_json())},
        "safety": main.get("safety", {}),
        "handover": None,
    }
    if handover and main["regions"]:
        best = next((q for q in main["regions"] if q.found), main["regions"][0])
        report["handover"] = {"region": best.rank, "stage_um": [float(best.x_um), float(best.y_um)],
                              "experiment": "vacancy_line",
                              "out": str(out / "handover")}
        from beamloop.edge.experiments.closed_loop import run as closed_loop_run

        sub = closed_loop_run(out / "handover", rounds=1, seed=seed, quiet=quiet, interrupt=interrupt)
        report["handover"]["outcome"] = sub["outcome"]
        if sub["outcome"]["reason"] and not outcome["reason"]:
            outcome.update(complete=False, reason=sub["outcome"]["reason"],
                           message=f"handover: {sub['outcome']['message']}", signum=sub["outcome"]["signum"])
    for what, fn in (("run.h5", lambda: write_run_file(out / "run.h5", results, report["config"])),
                     ("montage.png", lambda: write_montage(out / "montage.png", main, cfg.targets)
                      if main["maps"] else None),
                     ("report.json", lambda: write_text_file(out / "report.json",
                                                             json.dumps(report, indent=2, default=float))),
                     ("report.html", lambda: write_html(out / "report.html", report, main))):
        try:
            fn()
        except (RunLogError, OSError) as exc:
            outcome["output_errors"].append(f"{what}: {exc}")
    if outcome["output_errors"]:
        try:
            write_text_file(out / "report.json", json.dumps(report, indent=2, default=float))
        except RunLogError:
            pass
    if not quiet:
        for k, v in strategies.items():
            first = "-" if v["time_to_first_rare_s"] is None else f"{v['time_to_first_rare_s']:.0f} s"
            print(f"{k:>7}: {v['rare_found']} rare regions in {v['moves_used']} moves "
                  f"({v['rare_per_move']:.3f}/move), first after {first} (simulated)")
        if report["search"]["ratio_vs_raster"] is not None:
            print(f"search vs raster: {report['search']['ratio_vs_raster']:.2f}x rare regions per move; "
                  f"report in {out / 'report.html'}")
    return report


def load_image(path: str | Path) -> np.ndarray:
    """A 2D frame from any file :func:`beamloop.edge.io.imageio.read_image` reads (a stack: its first frame).

    Returns
    -------
    ndarray, shape (rows, cols), the file's dtype

    Raises
    ------
    ValueError
        The file is missing or unreadable (the reader's message).
    """
    try:
        a = read_image(path).data
    except ImageReadError as exc:
        raise ValueError(str(exc)) from None
    return a[0] if a.ndim == 3 else a
