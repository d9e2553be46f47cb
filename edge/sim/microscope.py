"""The simulated microscope: a scan controller (bridge server) and a HAADF detector (frame stream).

:class:`SimulatedMicroscope` is a :class:`beamloop.edge.control.controller.ScanController` over
:class:`SimulatedBackend`, which holds the physics only. It scans frames of a MoS2 monolayer on request
(``acquire_frame``) and streams them in the native beamloop protocol; it parks the probe where the bridge
asks (``set_probe``) and, while the beam is unblanked, streams the ADF signal at the parked probe: detector
counts per sample, one row of ``block_samples`` samples per message, paced by the controller's clock. A
parked-on S column loses atoms at random moments whose rate follows the electron dose it receives
(knock-on damage):

    rate per S atom = sigma * (I / e) * g(d),    g(d) = exp(-d^2 / 2 s^2) / (2 pi s^2)

with ``sigma`` the displacement cross-section, ``I`` the probe current, ``d`` the probe-column distance and
``s`` the probe's standard deviation (its areal density of electrons at the atom). Scanning frames damages
the specimen too: each S atom survives a frame with probability ``exp(-sigma * dose)``. The cross-section
is a model parameter (default 1 barn), not a measured value; for the physics of knock-on displacement in
MoS2 see H.-P. Komsa et al., "Two-dimensional transition metal dichalcogenides under electron
irradiation: defect production and doping", Phys. Rev. Lett. 109, 035503 (2012).

The microscope's scan controller has an ejection trigger next to the beam (a
:class:`~beamloop.edge.control.controller.TriggerProbe`): after ``arm_trigger`` it evaluates the shipped
integer model on every ADF sample as it produces a dwell's samples, with the same implementation the service
runs (:class:`beamloop.edge.trigger.model.ModelTrigger`, bit-exact with the FPGA logic of
:mod:`beamloop.fpga`), and blanks the beam at the end of the decision sample plus the logic's latency
(the manifest's ``logic`` entry: the RTL's cycles at its rated clock; :attr:`MicroscopeConfig.trigger_latency_ns`
for a model without a logic build). The beam's dose, and any later ejection, then ends at the blank.

Ground truth (column positions and classes of every frame, every ejection with its sample index) is
available through the simulator-only calls ``sim_ground_truth`` and ``sim_events``; ``sim_fresh_area``
puts back every atom removed so far (as moving to a fresh area of the same crystal, for long runs), and
``shutdown`` ends :meth:`SimulatedMicroscope.serve`.

**Point detectors** (a :class:`~beamloop.edge.control.controller.PointDetectors` backend): a queued point can
also record an EELS spectrum (:class:`beamloop.edge.sim.eels.EELSModel` of MoS2: S L2,3 and Mo M4,5 on a power-law
background, fine structure near vacancies, the spectrometer's dispersion and resolution) and a diffraction
pattern (:class:`beamloop.edge.sim.fourd.FourDMicroscope`, sum-binned by ``pattern_binning``), both Poisson
counts of the point's electrons (probe current times its dwell) at the probe's position on the specimen at the
point's end. The simulator-only call ``sim_point_truth`` gives their noise-free expectation (and the ADF
channel's expected counts per sample) at any fractions of a kept frame: the true property map.

**Drift and the scan coils** (:mod:`beamloop.edge.sim.drift`, off by default: ``drift_A_per_s`` 0 and
``coil_settle_us`` 0 simulate exactly what the microscope did before they were modelled). With drift on the
specimen moves on the controller's clock, continuously across frames and parked dwells: frames show the
columns where they are at each scan line's time (ground truth too), ``set_probe`` sends the probe to the
commanded position of the scan frame at the current time, knowing nothing of where the column now is, and
the parked-probe signal and knock-on rate follow the probe-to-column distance as the column drifts away.
Every parked series begins with a ``probe_landed`` event: where the probe is on the specimen (rest
coordinates, A), the nearest column and its distance (pm).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import zmq

from beamloop.edge.control.controller import (
    MAX_BLOCK_SAMPLES,
    SAMPLE_TIME_US,
    Acquisition,
    Capabilities,
    Dwell,
    ParkedStream,
    ScanController,
)
from beamloop.edge.control.keys import ServerKeys
from beamloop.edge.control.protocol import (
    MAX_POINT_REPLY_BYTES,
    BridgeError,
    ScanLimits,
    detector_point_bytes,
    encode_array,
)
from beamloop.edge.control.safety import SafetyLimits
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.physics import electrons_per_second
from beamloop.edge.sim import distortion as dist
from beamloop.edge.sim import lattice
from beamloop.edge.sim.drift import DriftConfig, SpecimenDrift, coil_response, hysteresis_offset
from beamloop.edge.sim.eels import EELSModel
from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope
from beamloop.edge.sim.frames import FrameSimulator, SimulatedFrame
from beamloop.edge.sim.parked import atoms_near_probe, blank_time_ns, happens_before, probe_density
from beamloop.edge.trigger.model import ModelTrigger, sample_trigger_models

BARN_A2 = 1e-8
"""One barn in square Angstrom (1e-24 cm^2)."""

FRAMES_KEPT = 32
"""Frames whose ground truth (and distortion, for parking on them) the simulator keeps."""


@dataclass
class MicroscopeConfig:
    """Settings of the simulated microscope.

    Attributes
    ----------
    frames, control : str
        Endpoints it binds: the frame stream (PUSH) and the bridge (REP).
    seed : int
        Seed of the specimen, the noise and the ejections.
    specimen_size_A : float
        Side of the square specimen area centred on the origin, Angstrom; frames must fit inside.
    rotation_deg : float or None
        Lattice rotation; random when None.
    s_mono, s_di, mo_vacancy : float
        Initial defect fractions (:func:`beamloop.edge.sim.lattice.add_point_defects`).
    current_pA : float
        Probe current, picoampere.
    blur_sigma_A : float
        Source-size blur, Angstrom.
    background_fraction : float
        Constant extra signal, fraction of probe electrons.
    distortion_scale : float
        Scale of drift, wobble and jitter in frames (0: none).
    sample_time_us : float
        Parked-probe ADF sample time (one count value per sample), microseconds.
    block_samples : int
        Samples per parked-probe message.
    cross_section_barn : float
        S displacement cross-section, barn.
    probe_sigma_A : float
        Standard deviation of the probe's current density, Angstrom.
    max_park_s : float
        The beam is blanked after this long unblanked at one position, and no queued point may dwell
        longer (:class:`beamloop.edge.control.safety.SafetyLimits` ``max_point_dwell_s``).
    max_point_electrons : float or None
        Dose limit per probe position, electrons (None: none).
    watchdog_s : float or None
        The bridge's watchdog: once a client has moved or unblanked the beam, silence for this long
        blanks it (or parks it, ``on_watchdog="park"``, at ``safe_position``). None disables it.
    on_watchdog : {"blank", "park"}
    safe_position : (x, y)
        Fractions of the current frame for ``on_watchdog="park"``.
    keys : ServerKeys or None
        CURVE keys of the bridge (:mod:`beamloop.edge.control.keys`); needed to bind it to a non-loopback address.
    scan_damage : bool
        Whether scanning a frame ejects atoms.
    encoding : {"raw", "lz4"}
        Frame stream encoding.
    insecure_frames : bool
        Allow binding the frame stream beyond loopback (it is neither encrypted nor authenticated).
    trigger : bool
        Whether the scan controller offers its ejection trigger (``arm_trigger``); False: a controller
        without one (the service then runs its own).
    trigger_latency_ns : float
        Sample in to blank out of the trigger's logic for a model whose manifest entry has no logic build
        recorded (``beamloop fpga build --record``), nanoseconds. The default, 200 ns, rounds up the
        190.4 ns of the shipped model's own build (21 cycles at 110.3 MHz, bench/results/fpga_ejection.md).
    drift_A_per_s : float
        Specimen drift speed, A/s (:class:`beamloop.edge.sim.drift.DriftConfig`); 0: no drift (as before
        drift was modelled). Post-settling drift of aberration-corrected STEMs: 0.017-0.17 A/s.
    drift_direction_deg : float or None
        Its direction, degrees from +x; random from the seed when None.
    drift_walk_A_per_sqrt_s : float
        Random walk on top of the constant drift, A per square-root second and axis (with drift on).
    drift_settle_A_per_s, drift_settle_tau_s : float
        Extra drift speed after a field-of-view change (A/s) and its exponential settling time (s).
    coil_settle_us, coil_overshoot : float
        Scan-coil step response on ``set_probe``: time constant (us; 0: instantaneous) and fractional
        overshoot in [0, 1) (:func:`beamloop.edge.sim.drift.coil_response`).
    coil_hysteresis_A : float
        Scan-coil hysteresis on ``set_probe``, A (0: none): the probe lands ``h`` short of the commanded
        position along the direction of the last coil move (:func:`beamloop.edge.sim.drift.hysteresis_offset`;
        a free parameter, no measured magnitude).
    point_detectors : bool
        Whether queued points can record an EELS spectrum and a diffraction pattern (module docstring).
    pattern_binning : int
        Sum-binning of the 96 x 96 pixel diffraction detector for point patterns (1, 2, 3, 4, 6, 8).

    Raises
    ------
    ValueError
        A setting outside its range (:meth:`check`): e.g. ``block_samples`` 0, ``sample_time_us`` 1e-9,
        ``distortion_scale`` NaN, ``max_point_electrons`` 0 (omit it for no dose limit).
    """

    frames: str = "tcp://127.0.0.1:5555"
    control: str = "tcp://127.0.0.1:5556"
    seed: int = 0
    specimen_size_A: float = 160.0
    rotation_deg: float | None = None
    s_mono: float = 0.02
    s_di: float = 0.005
    mo_vacancy: float = 0.003
    current_pA: float = 50.0
    blur_sigma_A: float = 0.25
    background_fraction: float = 2e-5
    distortion_scale: float = 1.0
    sample_time_us: float = 10.0
    block_samples: int = 100
    cross_section_barn: float = 1.0
    probe_sigma_A: float = 0.35
    max_park_s: float = 10.0
    max_point_electrons: float | None = None
    watchdog_s: float | None = 1.0
    on_watchdog: str = "blank"
    safe_position: tuple[float, float] = (0.0, 0.0)
    keys: ServerKeys | None = None
    scan_damage: bool = True
    encoding: str = "raw"
    insecure_frames: bool = False
    trigger: bool = True
    trigger_latency_ns: float = 200.0
    drift_A_per_s: float = 0.0
    drift_direction_deg: float | None = None
    drift_walk_A_per_sqrt_s: float = 0.005
    drift_settle_A_per_s: float = 0.0
    drift_settle_tau_s: float = 30.0
    coil_settle_us: float = 0.0
    coil_overshoot: float = 0.0
    coil_hysteresis_A: float = 0.0
    point_detectors: bool = True
    pattern_binning: int = 2

    LIMITS = {"shape": (16, 2048), "dwell_us": (0.05, 1000.0)}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings outside their range.

        Raises
        ------
        ValueError
            Naming the setting and its range.
        """
        def number(name: str, lo: float, hi: float = math.inf, *, low_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
                lo < v if low_open else lo <= v) and v <= hi
            if not ok:
                rng = f"{'(' if low_open else '['}{lo:g}, {hi:g}]"
                raise ValueError(f"{name} must be a finite number in {rng}, got {v!r}")

        number("specimen_size_A", 0.0, 1e5, low_open=True)
        if self.pattern_binning not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"pattern_binning must be one of 1, 2, 3, 4, 6, 8 (divisors of the 96-pixel detector), "
                             f"got {self.pattern_binning!r}")
        for name in ("s_mono", "s_di", "mo_vacancy"):
            number(name, 0.0, 1.0)
        number("current_pA", 0.0, 1e6, low_open=True)
        number("blur_sigma_A", 0.0, 100.0)
        number("background_fraction", 0.0, 1.0)
        number("distortion_scale", 0.0, 1e3)
        number("sample_time_us", *SAMPLE_TIME_US)
        if not (isinstance(self.block_samples, int) and not isinstance(self.block_samples, bool)
                and 1 <= self.block_samples <= MAX_BLOCK_SAMPLES):
            raise ValueError(f"block_samples must be a whole number in [1, {MAX_BLOCK_SAMPLES}], "
                             f"got {self.block_samples!r}")
        number("cross_section_barn", 0.0, 1e6)
        number("probe_sigma_A", 0.0, 100.0, low_open=True)
        number("max_park_s", 0.0, 3600.0, low_open=True)
        if self.max_point_electrons is not None:
            number("max_point_electrons", 0.0, low_open=True)
        if self.watchdog_s is not None:
            number("watchdog_s", 0.0, 3600.0, low_open=True)
        number("trigger_latency_ns", 0.0, 1e9)
        number("drift_A_per_s", 0.0, 1e3)
        if self.drift_direction_deg is not None:
            number("drift_direction_deg", -360.0, 360.0)
        number("drift_walk_A_per_sqrt_s", 0.0, 1e3)
        number("drift_settle_A_per_s", 0.0, 1e3)
        number("drift_settle_tau_s", 0.0, 1e6, low_open=True)
        number("coil_settle_us", 0.0, 1e6)
        number("coil_overshoot", 0.0, 0.99)
        number("coil_hysteresis_A", 0.0, 100.0)

    def drift_config(self) -> DriftConfig:
        """The specimen drift these settings ask for (seeded by ``seed``)."""
        return DriftConfig(self.drift_A_per_s, self.drift_direction_deg, self.drift_walk_A_per_sqrt_s,
                           self.drift_settle_A_per_s, self.drift_settle_tau_s, seed=self.seed)


class SimulatedBackend:
    """The physics of the simulated microscope: specimen, rendering, parked-probe signal, damage, ground truth.

    Implements :class:`beamloop.edge.control.controller.ScanBackend`,
    :class:`~beamloop.edge.control.controller.ParkedProbe` and
    :class:`~beamloop.edge.control.controller.TriggerProbe` (see the module docstring); holds no wire state.

    Parameters
    ----------
    config : MicroscopeConfig
    clock : callable, optional
        Monotonic seconds (the controller's clock): specimen drift and the scan coils run on it.

    Attributes
    ----------
    drift : beamloop.edge.sim.drift.SpecimenDrift or None
        The specimen's drift (None: ``drift_A_per_s`` and ``drift_settle_A_per_s`` are 0).
    specimen : beamloop.edge.sim.lattice.Specimen
        The crystal; ``counts`` (atoms per column and element) changes as atoms are ejected.
    imager : FrameSimulator
        Renders frames (replaceable, e.g. by a cache of rendered frames; parked samples read its
        ``renderer``).
    rng : numpy.random.Generator
        Seeded by ``config.seed``: specimen, noise and ejections.
    electrons_per_s : float
        Probe electrons per second.
    frames : dict int -> SimulatedFrame
        The last :data:`FRAMES_KEPT` frames acquired, by frame id.
    position_A : (float, float) or None
        Specimen position of the parked probe, Angstrom (without drift and coil response: as the frame parked
        on showed it; with them: rest coordinates of the specimen under the probe, as of the last samples).
    blanked : bool
        The blanker as last set.
    """

    def __init__(self, config: MicroscopeConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = cfg = config
        self.clock = clock
        dcfg = cfg.drift_config()
        self.drift: SpecimenDrift | None = SpecimenDrift(dcfg, clock()) if dcfg.enabled else None
        self._moving = self.drift is not None or cfg.coil_settle_us > 0 or cfg.coil_hysteresis_A > 0
        self._last_command: np.ndarray | None = None  # lab-frame position last commanded (hysteresis), A
        self._hysteresis = np.zeros(2)  # landing error of the last move (hysteresis), A
        self._probe_lab: tuple[np.ndarray, np.ndarray, float] | None = None  # target, previous, time commanded
        self._track = np.zeros(2)  # lab-frame rate the parked probe moves on at (drift compensation), A/s
        self._park_scan: ScanFrame | None = None
        self._last_fov: tuple[float, float] | None = None
        self.rng = np.random.default_rng(cfg.seed)
        half = cfg.specimen_size_A / 2
        rot = float(self.rng.uniform(0, 60)) if cfg.rotation_deg is None else cfg.rotation_deg
        self.specimen = lattice.mos2((-half, half, -half, half), rotation_deg=rot,
                                     origin_A=tuple(self.rng.uniform(-1, 1, 2)))
        lattice.add_point_defects(self.specimen, self.rng, s_mono=cfg.s_mono, s_di=cfg.s_di, mo_vacancy=cfg.mo_vacancy)
        self._initial_counts = self.specimen.counts.copy()
        self.imager = FrameSimulator(self.specimen, self.rng, blur_sigma_A=cfg.blur_sigma_A,
                                     background_fraction=cfg.background_fraction,
                                     distortion_scale=cfg.distortion_scale)
        self.electrons_per_s = electrons_per_second(cfg.current_pA)
        self.frames: dict[int, SimulatedFrame] = {}
        self.position_A: tuple[float, float] | None = None
        self.blanked = True
        self._models: dict[str, dict] | None = None
        self._triggers: dict[str, ModelTrigger] = {}
        self.trigger: ModelTrigger | None = None
        self.trigger_latency_ns = math.nan
        self._eels: EELSModel | None = None
        self._fourd: FourDMicroscope | None = None

    # ScanBackend -------------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """One ``haadf`` channel, the limits of ``config.LIMITS``, frames inside the specimen, the parked stream."""
        cfg = self.config
        max_fov = cfg.specimen_size_A / 10 / math.sqrt(2)
        (lo, hi), (dlo, dhi) = cfg.LIMITS["shape"], cfg.LIMITS["dwell_us"]
        limits = ScanLimits(shape=(int(lo), int(hi)), dwell_us=(float(dlo), float(dhi)), default_dwell_us=10.0,
                            channels=("haadf",), max_fov_nm=max_fov - 1.0)
        stream = ParkedStream(cfg.sample_time_us, cfg.block_samples, "haadf", "uint16",
                              {"current_pA": cfg.current_pA, "simulated": True})
        return Capabilities(limits, stream, {"max_fov_nm": max_fov, "current_pA": cfg.current_pA, "simulated": True})

    def set_frame(self, scan: ScanFrame, channels: tuple[str, ...]) -> dict:
        """Nothing to set up (with drift: a new field of view starts settling); the reply gets the frame's
        dose, electrons per square Angstrom."""
        half = self.config.specimen_size_A / 2
        reach = max(abs(scan.center_nm[0]), abs(scan.center_nm[1])) * 10 + max(scan.fov_nm) * 10 / math.sqrt(2)
        if reach > half:
            raise BridgeError("out_of_range", f"a frame centred at {list(scan.center_nm)} nm reaches beyond the "
                                              f"simulated specimen ({half / 10:g} nm from its centre)")
        if tuple(scan.center_nm) != (0.0, 0.0):  # a subscan moves no stage: no settling
            ay, ax = scan.pixel_size_A_yx
            return {"dose_e_per_A2": self.electrons_per_s * scan.dwell_us * 1e-6 / (ay * ax)}
        if self.drift is not None and tuple(scan.fov_nm) != self._last_fov:
            self.drift.fov_changed(self.clock())
        self._last_fov = tuple(scan.fov_nm)
        ay, ax = scan.pixel_size_A_yx
        return {"dose_e_per_A2": self.electrons_per_s * scan.dwell_us * 1e-6 / (ay * ax)}

    def acquire(self, scan: ScanFrame, channels: tuple[str, ...]) -> Acquisition:
        """Render ``scan`` (uint16 counts), keep its ground truth and, with ``scan_damage``, eject the S
        atoms the scan knocked out (events ``ejection``, cause ``scan``)."""
        rows, cols = scan.shape
        dwell = scan.dwell_us
        extra: dict = {}
        drift = self.drift
        if drift is None:
            frame = self.imager.acquire(scan, self.electrons_per_s * dwell * 1e-6)
        else:  # the scan starts now; its lines see the specimen where it is at their time
            t0 = self.clock()
            frame = self.imager.acquire(scan, self.electrons_per_s * dwell * 1e-6,
                                        motion=lambda t: drift.displacement(t0 + t))
            frame.t_start_s = t0
            extra = {"t_start_s": t0, "line_time_s": dist.line_time_s(scan, frame.distortion)}
        self.frames[scan.frame_id] = frame
        for old in [k for k in self.frames if k < scan.frame_id - FRAMES_KEPT]:
            del self.frames[old]
        events = self._scan_damage(frame) if self.config.scan_damage else []
        t = rows * cols * dwell * 1e-6
        return Acquisition({"haadf": frame.counts}, {"dose_e_per_A2": frame.dose_e_per_A2, "simulated": True, **extra},
                           count_time_s=t, frame_time_s=t, events=events)

    def park(self, fx: float, fy: float, frame_id: int) -> tuple[float, float]:
        """Put the probe on the specimen position that fraction ``(fx, fy)`` of frame ``frame_id`` showed
        (through that frame's scan distortion); returns ``(fx, fy)``.

        With drift or a coil response (module docstring) the probe goes instead to the commanded position of
        the scan frame (its nominal deflection) now, through the coils' step response: it lands wherever the
        specimen has drifted to.

        Raises
        ------
        KeyError
            The frame is not among the last :data:`FRAMES_KEPT` acquired.
        """
        fr = self.frames[frame_id]
        if not self._moving:
            x_px, y_px = fr.scan.pixel_of_fraction(fx, fy)
            x, y = dist.specimen_of_pixel(fr.scan, fr.distortion, x_px, y_px)
            self.position_A = (float(x), float(y))
            return fx, fy
        now = self.clock()
        lx, ly = fr.scan.specimen_of_fraction(fx, fy)
        target = np.array([float(lx), float(ly)])
        if self.config.coil_hysteresis_A > 0:
            self._hysteresis = hysteresis_offset(self._last_command, target, self.config.coil_hysteresis_A,
                                                 self._hysteresis)
            self._last_command = target
            target = target + self._hysteresis
        prev = target if self._probe_lab is None else self._probe_lab_at(np.array([now]))[0]
        self._probe_lab = (target, prev, now)
        self._track = np.zeros(2)
        self._park_scan = fr.scan
        px, py = self.probe_rest_A(np.array([now]))
        self.position_A = (float(px[0]), float(py[0]))
        return fx, fy

    def _probe_lab_at(self, t: np.ndarray) -> np.ndarray:
        """Deflection (lab frame, A) of the probe at clock times ``t``: shape (len(t), 2)."""
        assert self._probe_lab is not None
        target, prev, t_move = self._probe_lab
        r = coil_response((t - t_move) * 1e6, self.config.coil_settle_us, self.config.coil_overshoot)
        lab = target + r[:, None] * (prev - target)
        if self._track.any() and self._park_scan is not None:  # tracking: on at the set rate, inside the frame
            scan = self._park_scan
            lab = lab + np.clip(t - t_move, 0.0, None)[:, None] * self._track
            fx, fy = scan.fraction_of_specimen(lab[:, 0], lab[:, 1])
            x, y = scan.specimen_of_fraction(np.clip(fx, 0.0, 1.0), np.clip(fy, 0.0, 1.0))
            lab = np.stack([x, y], axis=1)
        return lab

    def track_probe(self, vx: float, vy: float) -> tuple[float, float]:
        """:class:`~beamloop.edge.control.controller.TrackingProbe`: move the parked probe on at ``(vx, vy)``
        fractions of its frame per second from its park (the scan coils' drift compensation; kept inside the
        frame). Only with drift or a coil response on (else the probe stays on the column the frame showed,
        as before drift was modelled): returns ``(0, 0)`` then, else the rate."""
        if not self._moving or self._park_scan is None:
            return 0.0, 0.0
        scan = self._park_scan
        x0, y0 = scan.specimen_of_fraction(0.0, 0.0)
        x1, y1 = scan.specimen_of_fraction(float(vx), float(vy))
        self._track = np.array([float(x1 - x0), float(y1 - y0)])
        return float(vx), float(vy)

    def probe_rest_A(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where on the specimen (its rest coordinates, A) the parked probe is at clock times ``t`` (1-D):
        its deflection less the specimen's drift (only with drift or a coil response; RuntimeError before
        a park)."""
        if self._probe_lab is None:
            raise RuntimeError("probe_rest_A() before park()")
        lab = self._probe_lab_at(np.asarray(t, np.float64))
        if self.drift is None:
            return lab[:, 0], lab[:, 1]
        dx, dy = self.drift.displacement(t)
        return lab[:, 0] - dx, lab[:, 1] - dy

    def _landing(self, dwell: Dwell) -> dict:
        """The ``probe_landed`` event of a parked series starting: the probe's rest position at the dwell's
        start, the nearest column and its distance (pm), and the drift so far."""
        if self._moving:
            px, py = self.probe_rest_A(np.array([dwell.started]))
            x, y = float(px[0]), float(py[0])
        else:
            assert self.position_A is not None
            x, y = self.position_A
        d = np.hypot(self.specimen.xy[:, 0] - x, self.specimen.xy[:, 1] - y)
        c = int(np.argmin(d))
        drift = [0.0, 0.0]
        if self.drift is not None:
            dx, dy = self.drift.displacement(dwell.started)
            drift = [float(dx), float(dy)]
        return {"type": "probe_landed", "series_id": dwell.series_id, "frame_id": dwell.frame_id,
                "probe_A": [x, y], "column": c, "distance_pm": float(d[c] * 100), "t_s": float(dwell.started),
                "drift_A": drift}

    def set_blanked(self, on: bool) -> bool:
        """Set the (simulated) blanker; returns it."""
        self.blanked = bool(on)
        return self.blanked

    # ParkedProbe -------------------------------------------------------------------------------------
    def parked_samples(self, n: int, dwell: Dwell) -> tuple[np.ndarray, list[dict]]:
        """``n`` samples of detector counts at the parked probe, with ejections along the way.

        Parameters
        ----------
        n : int
            Samples of ``config.sample_time_us`` each.
        dwell : Dwell
            The open dwell (its ``samples`` so far, ``series_id`` and ``frame_id`` label the events).

        Returns
        -------
        counts : ndarray, shape (n,) or (k + 1,), uint16
            Poisson counts of the expected ADF signal (column signal plus background) times the electrons
            per sample; with the trigger started (:meth:`start_trigger`) and firing on sample ``k`` of the
            block, only the samples up to that one (the beam is blanked then).
        events : list of dict
            One ``ejection`` (cause ``parked``) per S atom knocked out, at exponential waiting times with
            the summed knock-on rate (module docstring) of the S atoms within 4 probe sigmas (none after a
            trigger's blank), and the ``trigger`` event of a decision
            (:class:`~beamloop.edge.control.controller.TriggerProbe`).

        Raises
        ------
        RuntimeError
            The probe was never parked.
        """
        if self.position_A is None:
            raise RuntimeError("parked_samples() before park()")
        counts, events, fractions = (self._parked_counts_moving if self._moving else self._parked_counts)(n, dwell)
        landed = [self._landing(dwell)] if dwell.samples == 0 else []
        if self.trigger is not None:
            k = self.trigger.update(counts)
            if k >= 0:
                counts, events = self._blank_at(k, counts, events, fractions, dwell)
        return counts, landed + events

    def _parked_counts_moving(self, n: int, dwell: Dwell) -> tuple[np.ndarray, list[dict], list[float]]:
        """:meth:`_parked_counts` with the probe moving over the specimen (drift, coil response): the signal
        of each sample at the probe's rest position at the sample's middle, the knock-on rates at the block's
        middle."""
        dt = self.config.sample_time_us * 1e-6
        t = dwell.started + (dwell.samples + np.arange(n) + 0.5) * dt
        px, py = self.probe_rest_A(t)
        self.position_A = (float(px[-1]), float(py[-1]))
        return self._sample_with_ejections(n, dwell, float(px[n // 2]), float(py[n // 2]),
                                           lambda k0: self.imager.renderer.expected(px[k0:], py[k0:])[0])

    def _parked_counts(self, n: int, dwell: Dwell) -> tuple[np.ndarray, list[dict], list[float]]:
        """The samples of :meth:`parked_samples` with every ejection along the way, and where in its sample
        each ejection happened (fraction of the sample)."""
        assert self.position_A is not None
        x_A, y_A = self.position_A
        return self._sample_with_ejections(
            n, dwell, x_A, y_A,
            lambda k0: np.full(n - k0, self.imager.renderer.expected(np.array([x_A]), np.array([y_A]))[0, 0]))

    def _sample_with_ejections(self, n: int, dwell: Dwell, x_A: float, y_A: float,
                               expected) -> tuple[np.ndarray, list[dict], list[float]]:
        """``n`` parked-probe ADF samples (Poisson, uint16) with the S atoms the probe at ``(x_A, y_A)`` ejects on the
        way (knock-on rates of the atoms within reach, :func:`beamloop.edge.sim.parked.atoms_near_probe`), the
        ejection events and each one's fraction of its sample. ``expected(k0)`` gives the noise-free signal of
        samples ``k0 .. n - 1`` (fractions of the probe's electrons, shape ``(n - k0,)``) for the specimen as it
        is then: it is asked again after every ejection."""
        cfg = self.config
        dt = cfg.sample_time_us * 1e-6
        e_per_sample = self.electrons_per_s * dt
        s_el = self.specimen.elements.index("S")
        near, dist2 = atoms_near_probe(self.specimen.xy, x_A, y_A, cfg.probe_sigma_A)
        g = probe_density(dist2, cfg.probe_sigma_A)
        per_atom_rate = cfg.cross_section_barn * BARN_A2 * self.electrons_per_s * g  # 1/s per S atom
        lam = np.empty(n)
        events: list[dict] = []
        fractions: list[float] = []
        k0 = 0
        while k0 < n:
            f = expected(k0)
            rate_now = float((per_atom_rate * self.specimen.counts[near, s_el]).sum())
            k_eject = n
            if rate_now > 0:
                t_next = self.rng.exponential(1.0 / rate_now)
                k_eject = k0 + int(t_next / dt)
                frac = t_next / dt - int(t_next / dt)
            k1 = min(k_eject, n)
            lam[k0:k1] = (f[:k1 - k0] + cfg.background_fraction) * e_per_sample
            if k_eject < n:
                w = per_atom_rate * self.specimen.counts[near, s_el]
                c = near[self.rng.choice(len(near), p=w / w.sum())]
                self.specimen.counts[c, s_el] -= 1
                events.append({"type": "ejection", "cause": "parked", "column": int(c), "element": "S",
                               "series_id": dwell.series_id, "frame_id": dwell.frame_id,
                               "sample": dwell.samples + k_eject})
                fractions.append(frac)
                lam[k_eject] = (f[k_eject - k0] + cfg.background_fraction) * e_per_sample
                k0 = k_eject + 1
            else:
                k0 = n
        return np.minimum(self.rng.poisson(lam), 65535).astype(np.uint16), events, fractions

    def _blank_at(self, k: int, counts: np.ndarray, events: list[dict], fractions: list[float],
                  dwell: Dwell) -> tuple[np.ndarray, list[dict]]:
        """The trigger fired on sample ``k`` of this block: the beam is blanked at the end of that sample
        plus the logic's latency; an ejection drawn after the blank did not happen (its atom is put back)."""
        trig = self.trigger
        assert trig is not None
        dt_us = self.config.sample_time_us
        decision = dwell.samples + k
        t_blank = blank_time_ns(decision, dt_us, self.trigger_latency_ns)
        s_el = self.specimen.elements.index("S")
        kept = []
        for ev, frac in zip(events, fractions):
            if happens_before(ev["sample"], frac, t_blank, dt_us):
                kept.append(ev)
            else:
                self.specimen.counts[ev["column"], s_el] += 1
        base = trig.baseline_rate
        kept.append({"type": "trigger", "sample": decision, "blank_time_ns": t_blank,
                     "latency_ns": self.trigger_latency_ns, "model": trig.model_name, "threshold": trig.threshold,
                     "baseline_rate": None if math.isnan(base) else float(base), "series_id": dwell.series_id,
                     "frame_id": dwell.frame_id})
        self.blanked = True  # the logic's blank line
        self.trigger = None
        return counts[:k + 1], kept

    # TriggerProbe ------------------------------------------------------------------------------------
    def trigger_models(self) -> dict[str, dict]:
        """The shipped sample-stream models (:func:`beamloop.edge.trigger.model.sample_trigger_models`), each
        with its ``latency_ns`` (``latency_source``: ``manifest``, or ``config`` where the manifest records no
        logic build and :attr:`MicroscopeConfig.trigger_latency_ns` stands in); none when ``config.trigger``
        is off. The first call (the scan controller's, at its start) also loads each model and runs it on one
        block, so its kernels are compiled (or read from numba's cache) before any dwell, not under the beam."""
        if self._models is None:
            self._models = {}
            if self.config.trigger:
                for name, m in sample_trigger_models().items():
                    warm = self._triggers[name] = ModelTrigger(name)
                    warm.start(None)
                    warm.update(np.zeros(self.config.block_samples, np.uint16))  # the dtype of parked_samples
                    rated = m["latency_ns"] is not None
                    self._models[name] = {**m, "latency_ns": float(m["latency_ns"] if rated
                                                                    else self.config.trigger_latency_ns),
                                          "latency_source": "manifest" if rated else "config"}
        return {k: dict(v) for k, v in self._models.items()}

    def start_trigger(self, model: str, threshold: int, expected_rate: float | None) -> float:
        """Start :class:`~beamloop.edge.trigger.model.ModelTrigger` ``model`` at ``threshold`` on the next
        sample (history pre-filled for ``expected_rate``); returns the logic's latency, ns.

        Raises
        ------
        KeyError
            ``model`` is not offered (:meth:`trigger_models`).
        ValueError
            ``expected_rate`` not a positive finite number.
        """
        info = self.trigger_models()[model]
        trig = self._triggers.get(model)
        if trig is None:
            trig = self._triggers[model] = ModelTrigger(model)
        trig.threshold = int(threshold)
        trig.start(expected_rate)
        self.trigger, self.trigger_latency_ns = trig, float(info["latency_ns"])
        return self.trigger_latency_ns

    def stop_trigger(self) -> None:
        """Stop deciding."""
        self.trigger = None

    # simulator only ----------------------------------------------------------------------------------
    def _scan_damage(self, frame: SimulatedFrame) -> list[dict]:
        """Eject S atoms of the scanned area with probability 1 - exp(-sigma * dose); one event per column hit."""
        s = self.specimen.elements.index("S")
        idx = frame.truth_index
        n = self.specimen.counts[idx, s].astype(np.int64)
        p = 1.0 - math.exp(-self.config.cross_section_barn * BARN_A2 * frame.dose_e_per_A2)
        lost = self.rng.binomial(n, p)
        self.specimen.counts[idx, s] -= lost.astype(np.int16)
        return [{"type": "ejection", "cause": "scan", "column": int(idx[k]), "element": "S",
                 "frame_id": frame.scan.frame_id} for k in np.flatnonzero(lost)]

    # PointDetectors ----------------------------------------------------------------------------------
    @property
    def eels(self) -> EELSModel:
        """The EELS of the specimen (MoS2, :data:`beamloop.edge.sim.eels.MATERIALS`), built on first use."""
        if self._eels is None:
            self._eels = EELSModel(self.specimen, "MoS2")
        return self._eels

    @property
    def fourd(self) -> FourDMicroscope:
        """The 4D-STEM model of the specimen (:class:`beamloop.edge.sim.fourd.FourDMicroscope`), built on first use."""
        if self._fourd is None:
            self._fourd = FourDMicroscope(self.specimen, FourDConfig())
        return self._fourd

    def point_detectors(self) -> dict[str, dict]:
        """:class:`~beamloop.edge.control.controller.PointDetectors`: ``eels`` (the MoS2 spectrometer's
        calibration: ``offset_eV``, ``dispersion_eV``, ``channels``, ``resolution_eV``; uint32 counts) and
        ``pattern`` (``shape`` after ``binning`` of the ``detector_shape``, ``disk_radius_px`` in binned pixels;
        uint32 counts); none with ``config.point_detectors`` off."""
        if not self.config.point_detectors:
            return {}
        from beamloop.edge.sim.eels import MATERIALS

        mat = MATERIALS["MoS2"]
        fcfg = FourDConfig()
        b = self.config.pattern_binning
        rows, cols = fcfg.detector_shape
        return {"eels": {**mat.spectrometer.as_dict(), "dtype": "<u4", "material": mat.name,
                         "edges": [e.name for e in mat.edges]},
                "pattern": {"shape": [rows // b, cols // b], "binning": b, "detector_shape": [rows, cols],
                            "disk_radius_px": fcfg.disk_radius_px / b, "dtype": "<u4"}}

    def _bin(self, p: np.ndarray) -> np.ndarray:
        """Sum-bin patterns (n, rows, cols) by ``config.pattern_binning`` (exact, in float64 or integers)."""
        b = self.config.pattern_binning
        n, rows, cols = p.shape
        return p.reshape(n, rows // b, b, cols // b, b).sum(axis=(2, 4))

    def point_signals(self, fx: float, fy: float, frame_id: int, dwell_us: float,
                      detectors: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Poisson counts of ``electrons_per_s * dwell_us`` electrons at the probe's specimen position now:
        ``eels`` (channels,) uint32, ``pattern`` (rows, cols) uint32 (module docstring).

        Raises
        ------
        RuntimeError
            The probe was never parked.
        """
        if self.position_A is None:
            raise RuntimeError("point_signals() before park()")
        x, y = np.array([self.position_A[0]]), np.array([self.position_A[1]])
        electrons = self.electrons_per_s * dwell_us * 1e-6
        out: dict[str, np.ndarray] = {}
        if "eels" in detectors:
            out["eels"] = self.eels.spectra(x, y, electrons, self.rng, np.uint32)[0]
        if "pattern" in detectors:
            lam = self.fourd.expected(x, y) * electrons
            counts = self._bin(self.rng.poisson(lam))
            out["pattern"] = np.minimum(counts, np.iinfo(np.uint32).max).astype(np.uint32)[0]
        return out

    def point_truth(self, points: np.ndarray, frame_id: int, detector: str, dwell_us: float) -> np.ndarray:
        """Noise-free expectation of a point measurement at fractions ``points`` ((k, 2) ``(fx, fy)``) of frame
        ``frame_id`` (the positions :meth:`park` would put the probe at, without drift's motion):

        ``adf`` (k,) expected ADF counts per sample (the expectation of ``fetch_points``' ``mean_counts``);
        ``eels`` (k, channels) and ``pattern`` (k, rows, cols) expected counts of ``dwell_us``, float64.

        Raises
        ------
        KeyError
            The frame is not among the last :data:`FRAMES_KEPT` acquired.
        ValueError
            Another detector.
        """
        fr = self.frames[frame_id]
        p = np.asarray(points, np.float64).reshape(-1, 2)
        if self._moving:
            x, y = fr.scan.specimen_of_fraction(p[:, 0], p[:, 1])
        else:
            x_px, y_px = fr.scan.pixel_of_fraction(p[:, 0], p[:, 1])
            x, y = dist.specimen_of_pixel(fr.scan, fr.distortion, x_px, y_px)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        electrons = self.electrons_per_s * dwell_us * 1e-6
        if detector == "adf":
            e_per_sample = self.electrons_per_s * self.config.sample_time_us * 1e-6
            return (self.imager.renderer.expected(x, y)[0] + self.config.background_fraction) * e_per_sample
        if detector == "eels":
            return self.eels.expected(x, y) * electrons
        if detector == "pattern":
            return self._bin(self.fourd.expected(x, y) * electrons)
        raise ValueError(f"detector must be adf, eels or pattern, got {detector!r}")

    def ground_truth(self, frame_id: int) -> dict:
        """The ``sim_ground_truth`` reply for frame ``frame_id`` (decode with :func:`decode_ground_truth`).

        Raises
        ------
        BridgeError
            (``out_of_range``) no ground truth kept for that frame.
        """
        fr = self.frames.get(frame_id)
        if fr is None:
            raise BridgeError("out_of_range", f"no ground truth kept for frame {frame_id!r}")
        out = {"frame_id": frame_id, "n": len(fr.truth_xy), "xy": fr.truth_xy.astype("<f8").tobytes(),
               "cls": fr.truth_cls.astype("i1").tobytes(), "index": fr.truth_index.astype("<i8").tobytes(),
               "class_names": list(fr.class_names), "pixel_size_A": fr.pixel_size_A,
               "dose_e_per_A2": fr.dose_e_per_A2, "distortion": asdict(fr.distortion),
               "rest_xy_A": self.specimen.xy[fr.truth_index].astype("<f8").tobytes()}
        if self.drift is not None:
            t0 = fr.t_start_s
            dx, dy = self.drift.displacement(t0)
            out.update(t_start_s=t0, line_time_s=dist.line_time_s(fr.scan, fr.distortion),
                       drift_A=[float(dx), float(dy)], drift_A_per_s=list(self.drift.velocity(t0)))
        return out

    def fresh_area(self) -> int:
        """Put back every atom removed so far; returns how many."""
        restored = int((self._initial_counts - self.specimen.counts).sum())
        self.specimen.counts[:] = self._initial_counts
        return restored


class SimulatedMicroscope(ScanController):
    """Scan controller and detector in one process: a :class:`ScanController` over :class:`SimulatedBackend`.

    Parameters
    ----------
    config : MicroscopeConfig, optional
    context : zmq.Context, optional
    clock : callable, optional
        Monotonic seconds (default :func:`time.monotonic`): the watchdog, the parked-beam time limit and
        the pacing of parked-probe samples run on it (tests pass a clock they move by hand).

    Attributes
    ----------
    config : MicroscopeConfig
    backend : SimulatedBackend
    specimen, imager, rng, electrons_per_s
        Those of :attr:`backend`.
    park : tuple or None
        ``(x_A, y_A, fx, fy, frame_id)``: where the probe is parked, on the specimen and in the frame.

    Raises
    ------
    zmq.ZMQError
        An endpoint cannot be bound (e.g. already in use).
    """

    backend: SimulatedBackend

    def __init__(self, config: MicroscopeConfig | None = None, context: zmq.Context | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = cfg = config or MicroscopeConfig()
        limits = SafetyLimits(max_point_dwell_s=cfg.max_park_s, max_point_electrons=cfg.max_point_electrons,
                              current_pA=cfg.current_pA, max_pixel_dwell_us=cfg.LIMITS["dwell_us"][1],
                              watchdog_s=cfg.watchdog_s, on_watchdog=cfg.on_watchdog,
                              safe_position=(float(cfg.safe_position[0]), float(cfg.safe_position[1])))
        calls = {"sim_ground_truth": self._sim_ground_truth, "sim_events": self._sim_events,
                 "sim_point_truth": self._sim_point_truth,
                 "sim_fresh_area": self._sim_fresh_area, "shutdown": self._shutdown}
        super().__init__(SimulatedBackend(cfg, clock), control=cfg.control, frames=cfg.frames, limits=limits,
                         keys=cfg.keys, context=context, clock=clock, encoding=cfg.encoding, calls=calls,
                         insecure_frames=cfg.insecure_frames)

    def __enter__(self) -> SimulatedMicroscope:
        return self

    @property
    def specimen(self) -> lattice.Specimen:
        """The backend's specimen."""
        return self.backend.specimen

    @property
    def imager(self) -> FrameSimulator:
        """The backend's imager (settable)."""
        return self.backend.imager

    @imager.setter
    def imager(self, imager) -> None:
        self.backend.imager = imager

    @property
    def rng(self) -> np.random.Generator:
        """The backend's random generator."""
        return self.backend.rng

    @property
    def electrons_per_s(self) -> float:
        """Probe electrons per second."""
        return self.backend.electrons_per_s

    @property
    def park(self) -> tuple[float, float, float, float, int] | None:
        """``(x_A, y_A, fx, fy, frame_id)`` of the parked probe, None when it is not parked."""
        if self.probe is None or self.backend.position_A is None:
            return None
        return (*self.backend.position_A, *self.probe)

    # simulator-only calls ------------------------------------------------------------------------------
    def _sim_ground_truth(self, args: dict) -> dict:
        fid = args.get("frame_id")
        if not isinstance(fid, int) or isinstance(fid, bool):
            raise BridgeError("bad_request", f"sim_ground_truth needs frame_id (integer), got {fid!r}")
        self.run_pending()
        return self.backend.ground_truth(fid)

    def _sim_events(self, args: dict) -> dict:
        since = args.get("since", 0)
        if not isinstance(since, int) or isinstance(since, bool):
            raise BridgeError("bad_request", f"sim_events: since must be an integer, got {since!r}")
        limit = args.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise BridgeError("bad_request", f"sim_events: limit must be a whole number >= 0, got {limit!r}")
        events = self.events.since(since)
        return {"events": events if limit is None else events[:limit], "next": self.events.total,
                "dropped_before": self.events.base}

    def _sim_point_truth(self, args: dict) -> dict:
        """``sim_point_truth``: ``points [[fx, fy], ...]``, ``frame_id``, ``detector``, ``dwell_us`` -> ``{"truth":
        array}`` (:meth:`SimulatedBackend.point_truth`, float64 in :func:`~beamloop.edge.control.protocol.encode_array`
        form)."""
        pts, fid, det = args.get("points"), args.get("frame_id"), args.get("detector")
        dwell = args.get("dwell_us", 1.0)
        if not (isinstance(pts, list) and pts and all(isinstance(p, list) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p) for p in pts)):
            raise BridgeError("bad_request", "sim_point_truth needs points [[fx, fy], ...] (finite numbers)")
        if not isinstance(fid, int) or isinstance(fid, bool) or fid not in self.backend.frames:
            raise BridgeError("stale_frame", f"sim_point_truth: frame {fid!r:.40} is not among the kept frames")
        if det not in ("adf", *self.point_detectors):
            raise BridgeError("out_of_range", f"sim_point_truth: detector {det!r:.40} not fitted "
                                              f"(it has {sorted(self.point_detectors)})")
        if isinstance(dwell, bool) or not isinstance(dwell, (int, float)) or not (math.isfinite(dwell) and dwell > 0):
            raise BridgeError("bad_request", f"sim_point_truth dwell_us {dwell!r:.40} is not a positive number")
        per = 8 * (1 if det == "adf" else detector_point_bytes(det, self.point_detectors[det]) // 4)
        if len(pts) * per > MAX_POINT_REPLY_BYTES:
            raise BridgeError("out_of_range", f"sim_point_truth: {len(pts)} points of {det} exceed one reply; "
                                              f"at most {MAX_POINT_REPLY_BYTES // per}")
        self.run_pending()
        truth = self.backend.point_truth(np.array(pts, np.float64), fid, det, float(dwell))
        return {"truth": encode_array(np.asarray(truth, np.float64)), "detector": det}

    def _sim_fresh_area(self, args: dict) -> dict:
        return {"restored_atoms": self.backend.fresh_area()}

    def _shutdown(self, args: dict) -> dict:
        self.stop_serving()
        return {"stopping": True}


def decode_ground_truth(result: dict) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Arrays of a ``sim_ground_truth`` reply.

    Parameters
    ----------
    result : dict
        The reply (:meth:`SimulatedBackend.ground_truth`).

    Returns
    -------
    xy : ndarray, shape (n, 2), float64
        Column positions ``(x, y)``, pixels of the frame.
    cls : ndarray, shape (n,), int8
        Classes, indices into ``class_names``.
    class_names : tuple of str
    """
    n = int(result["n"])
    xy = np.frombuffer(result["xy"], "<f8").reshape(n, 2)
    cls = np.frombuffer(result["cls"], "i1")
    return xy, cls, tuple(result["class_names"])
