"""Parked-probe ADF streams with ground truth, for training and evaluating ejection triggers.

The physics is the simulated microscope's, from :mod:`beamloop.edge.sim.parked`: the expected HAADF
fraction at the probe from the linear incoherent model (:class:`beamloop.edge.sim.render.ColumnRenderer` on
a MoS2 specimen from :mod:`beamloop.edge.sim.lattice`, abTEM single-atom profiles), plus a constant
background fraction, times the beam electrons per sample, Poisson-distributed
(:func:`beamloop.edge.sim.parked.expected_counts`). At 50 pA and 10 us that is about 7.5 counts per
sample on an S2 column. On top of the microscope's physics a stream here may have

- **beam-current fluctuation**: relative current ``1 + trend * t + u(t)``, ``u`` an Ornstein-Uhlenbeck
  (AR(1)) process of relative rms ``current_noise_rel`` and correlation time ``current_tau_s``
  (cold-FEG emission noise and slow decay);
- **drift off the column**: the probe starts ``offset`` Angstrom from the column (parking error plus
  drift accumulated earlier in the dwell) and moves at ``drift_A_per_s`` in a random direction;
- **background**: a constant extra fraction of the probe electrons (support film, contamination);
- **an event** at a random sample: an S atom of the target column is ejected (S2 -> S1, S1 -> empty
  site) or hops to a neighbouring site (the Mo column's top site or a neighbouring S site within
  3.3 Angstrom), after which the expected fraction is re-rendered.

:func:`training_segments` makes short segments (history + a few decisions) for training;
:func:`dwell_streams` makes whole dwells from the moment the beam is unblanked, with the event time drawn
from the knock-on rate at the column (:func:`beamloop.edge.sim.parked.knockon_rate`), for evaluation;
:func:`check_dwells` makes fixed-length dwells with events anywhere, the first history included, for
sample-by-sample checks of a trigger implementation against the runtime (the FPGA logic), and
:func:`save_dwells` writes them in the file format ``beamloop fpga sim --stream`` reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.signal import lfilter

from beamloop.edge.sim import lattice
from beamloop.edge.sim.frames import electrons_per_second
from beamloop.edge.sim.parked import expected_counts, knockon_rate, samples_to_next_ejection
from beamloop.edge.sim.profiles import profile_table
from beamloop.edge.sim.render import ColumnRenderer

NO_EVENT = -1
"""Event sample of a stream without an event."""


@dataclass(frozen=True)
class StreamConditions:
    """Ranges from which each stream's nuisance parameters are drawn (uniform unless stated).

    Attributes
    ----------
    current_pA : (lo, hi)
        Probe current range, picoampere (log-uniform).
    deployed_fraction : float
        Fraction of streams at exactly ``deployed_current_pA`` (the main job's regime).
    deployed_current_pA : float
    sample_time_us : float
        ADF sample time, microseconds (10 us in the main job).
    current_noise_rel : (lo, hi)
        Relative rms of the current fluctuation.
    current_tau_s : (lo, hi)
        Its correlation time, seconds (log-uniform).
    current_trend_per_s : (lo, hi)
        Relative linear current change per second.
    offset_A : (lo, hi)
        Probe-to-column distance at the stream's start, Angstrom.
    drift_A_per_s : (lo, hi)
        Probe drift speed, Angstrom per second.
    background_fraction : (lo, hi)
        Constant extra fraction of probe electrons.
    s1_target_fraction : float
        Fraction of streams parked on an S1 column instead of an S2 column.
    hop_fraction : float
        Fraction of events that are hops to a neighbour site rather than ejections.
    blur_sigma_A : float
        Source-size blur of the profiles, Angstrom (as the microscope).
    cross_section_barn : float
        S displacement cross-section for event times of whole dwells (as the microscope, default 1 barn).
    probe_sigma_A : float
        Probe standard deviation for the knock-on rate, Angstrom (as the microscope).
    """

    current_pA: tuple = (30.0, 80.0)
    deployed_fraction: float = 0.5
    deployed_current_pA: float = 50.0
    sample_time_us: float = 10.0
    current_noise_rel: tuple = (0.0, 0.05)
    current_tau_s: tuple = (1e-4, 1e-2)
    current_trend_per_s: tuple = (-0.2, 0.2)
    offset_A: tuple = (0.0, 0.4)
    drift_A_per_s: tuple = (0.0, 0.5)
    background_fraction: tuple = (0.0, 5e-4)
    s1_target_fraction: float = 0.15
    hop_fraction: float = 0.3
    blur_sigma_A: float = 0.25
    cross_section_barn: float = 1.0
    probe_sigma_A: float = 0.35

    @classmethod
    def clean(cls) -> StreamConditions:
        """The main job's simulated microscope: 50 pA, steady current, no drift, background 2e-5, the
        probe within ~0.03 Angstrom of an S2 column (the finder's error), ejections only."""
        return cls(current_pA=(50.0, 50.0), deployed_fraction=1.0, current_noise_rel=(0.0, 0.0),
                   current_trend_per_s=(0.0, 0.0), offset_A=(0.0, 0.03), drift_A_per_s=(0.0, 0.0),
                   background_fraction=(2e-5, 2e-5), s1_target_fraction=0.0, hop_fraction=0.0)

    def as_dict(self) -> dict:
        """JSON-ready dict of the ranges."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def with_(self, **kw) -> StreamConditions:
        """A copy with some fields replaced."""
        return replace(self, **kw)


@dataclass
class Streams:
    """A set of simulated streams.

    Attributes
    ----------
    counts : list of ndarray, shape (n_i,), uint16
        Detector counts per sample.
    event : ndarray, shape (n_streams,), int64
        First sample with the post-event rate, or :data:`NO_EVENT`.
    kind : list of str
        ``"eject"``, ``"hop"`` or ``"none"``.
    rate0 : ndarray, shape (n_streams,), float64
        Expected counts per sample at the first sample.
    drop : ndarray, shape (n_streams,), float64
        Expected rate just after the event over just before (1 for no event).
    current_pA : ndarray, shape (n_streams,)
    sample_time_us : float
    """

    counts: list
    event: np.ndarray
    kind: list
    rate0: np.ndarray
    drop: np.ndarray
    current_pA: np.ndarray
    sample_time_us: float

    def __len__(self) -> int:
        """Number of streams."""
        return len(self.counts)

    @property
    def seconds(self) -> float:
        """Total duration of all streams, seconds."""
        return sum(len(c) for c in self.counts) * self.sample_time_us * 1e-6


class _Patch:
    """A MoS2 specimen patch with point defects and its renderer; targets are S2/S1 columns near the middle."""

    def __init__(self, rng: np.random.Generator, blur_sigma_A: float, half_A: float = 12.0) -> None:
        self.spec = lattice.mos2((-half_A, half_A, -half_A, half_A), rotation_deg=float(rng.uniform(0, 60)),
                                 origin_A=tuple(rng.uniform(-1, 1, 2)))
        lattice.add_point_defects(self.spec, rng, s_mono=0.08, s_di=0.02, mo_vacancy=0.01)
        self.renderer = ColumnRenderer(self.spec, profile_table(self.spec.elements, blur_sigma_A))
        s = self.spec.elements.index("S")
        inner = np.hypot(self.spec.xy[:, 0], self.spec.xy[:, 1]) < half_A - 6.0
        mo_free = self.spec.counts[:, 1 - s] == 0
        self.s2 = np.flatnonzero(inner & mo_free & (self.spec.counts[:, s] == 2))
        self.s1 = np.flatnonzero(inner & mo_free & (self.spec.counts[:, s] == 1))
        self.s = s

    def fraction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Expected HAADF fraction at probe positions (n,) Angstrom."""
        return self.renderer.expected(x[None, :], y[None, :])[0]

    def event(self, target: int, kind: str, rng: np.random.Generator) -> int:
        """Remove one S atom from ``target`` (and, for a hop, add it to a neighbouring site within 3.3
        Angstrom); returns the neighbour's index for :meth:`undo`, or -1."""
        s = self.s
        self.spec.counts[target, s] -= 1
        if kind != "hop":
            return -1
        d = np.hypot(*(self.spec.xy - self.spec.xy[target]).T)
        near = np.flatnonzero((d > 0.5) & (d < 3.3) & (self.spec.counts[:, s] < 2))
        c = int(rng.choice(near))
        self.spec.counts[c, s] += 1
        return c

    def undo(self, target: int, hop: int) -> None:
        """Undo :meth:`event`."""
        self.spec.counts[target, self.s] += 1
        if hop >= 0:
            self.spec.counts[hop, self.s] -= 1


def _uniform(rng: np.random.Generator, lohi: tuple, log: bool = False) -> float:
    """One draw from ``[lo, hi)``, uniform or (``log``) log-uniform; ``lo`` itself when ``lo == hi``."""
    lo, hi = lohi
    if lo == hi:
        return float(lo)
    if log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def _current_factor(n: int, dt: float, cond: StreamConditions, rng: np.random.Generator, t0: float) -> np.ndarray:
    """Relative beam current per sample: ``1 + trend * t + OU noise`` (floored at 0.05)."""
    t = t0 + np.arange(n) * dt
    c = 1.0 + _uniform(rng, cond.current_trend_per_s) * t
    sigma = _uniform(rng, cond.current_noise_rel)
    if sigma > 0:
        a = math.exp(-dt / _uniform(rng, cond.current_tau_s, log=True))
        e = rng.standard_normal(n) * sigma * math.sqrt(1 - a * a)
        e[0] = rng.standard_normal() * sigma
        c += lfilter([1.0], [1.0, -a], e)
    return np.maximum(c, 0.05)


def _one_stream(patch: _Patch, cond: StreamConditions, rng: np.random.Generator, n: int, event: int,
                kind: str, t0: float) -> tuple[np.ndarray, float, float, float]:
    """Counts of one stream of ``n`` samples with ``kind`` at ``event`` (or none); returns counts, rate at
    the first sample, the rate ratio across the event, and the current."""
    dt = cond.sample_time_us * 1e-6
    pool = patch.s1 if (rng.random() < cond.s1_target_fraction and len(patch.s1)) else patch.s2
    target = int(rng.choice(pool))
    cur = (cond.deployed_current_pA if rng.random() < cond.deployed_fraction
           else _uniform(rng, cond.current_pA, log=True))
    phi0, phi1 = rng.uniform(0, 2 * math.pi, 2)
    r0 = _uniform(rng, cond.offset_A)
    v = _uniform(rng, cond.drift_A_per_s)
    t = np.arange(n) * dt
    x = patch.spec.xy[target, 0] + r0 * math.cos(phi0) + v * math.cos(phi1) * t
    y = patch.spec.xy[target, 1] + r0 * math.sin(phi0) + v * math.sin(phi1) * t
    f = patch.fraction(x, y)
    drop = 1.0
    if 0 <= event < n:
        hop = patch.event(target, kind, rng)
        f_after = patch.fraction(x[event:], y[event:])
        patch.undo(target, hop)
        drop = float(f_after[0] / max(f[event], 1e-12))
        f[event:] = f_after
    bg = _uniform(rng, cond.background_fraction)
    lam = expected_counts(f, bg, electrons_per_second(cur), dt) * _current_factor(n, dt, cond, rng, t0)
    counts = np.minimum(rng.poisson(lam), 65535).astype(np.uint16)
    return counts, float(lam[0]), drop, cur


def training_segments(n_segments: int, length: int, event_range: tuple[int, int], event_fraction: float,
                      cond: StreamConditions, seed: int, streams_per_patch: int = 200) -> Streams:
    """Short streams for training: each ``length`` samples, an event (ejection or hop) in ``event_range``
    (sample indices, half-open) for ``event_fraction`` of them.

    Parameters
    ----------
    n_segments, length : int
    event_range : (lo, hi)
        Event sample drawn uniformly in ``[lo, hi)``.
    event_fraction : float
        Fraction of segments with an event.
    cond : StreamConditions
    seed : int
    streams_per_patch : int
        Streams drawn from one specimen patch before a new one (new rotation and defects) is made.

    Returns
    -------
    Streams

    Raises
    ------
    ValueError
        Event range outside the segment.
    """
    lo, hi = event_range
    if not (0 <= lo < hi <= length):
        raise ValueError(f"event range {event_range} must lie inside a segment of {length} samples")
    rng = np.random.default_rng(seed)
    out = Streams([], np.empty(n_segments, np.int64), [], np.empty(n_segments), np.empty(n_segments),
                  np.empty(n_segments), cond.sample_time_us)
    patch = None
    for i in range(n_segments):
        if i % streams_per_patch == 0:
            patch = _Patch(rng, cond.blur_sigma_A)
        has = rng.random() < event_fraction
        kind = ("hop" if rng.random() < cond.hop_fraction else "eject") if has else "none"
        ev = int(rng.integers(lo, hi)) if has else NO_EVENT
        # a segment starts somewhere within a dwell of up to 2 s: that decides the current trend's offset
        counts, r0, drop, cur = _one_stream(patch, cond, rng, length, ev, kind, t0=float(rng.uniform(0, 2.0)))
        out.counts.append(counts)
        out.event[i], out.rate0[i], out.drop[i], out.current_pA[i] = ev, r0, drop, cur
        out.kind.append(kind)
    return out


def dwell_streams(n_dwells: int, cond: StreamConditions, seed: int, min_event: int = 256, tail: int = 2000,
                  max_samples: int = 200_000, streams_per_patch: int = 50) -> Streams:
    """Whole dwells from the moment the beam is unblanked to ``tail`` samples after the event.

    The event sample is ``min_event`` plus an exponential waiting time at the knock-on rate of the
    column's S atoms under the probe (:func:`beamloop.edge.sim.parked.knockon_rate`: ``sigma * I/e * g(d)``
    per atom, ``g`` the probe's Gaussian areal density, taken at the column, ``d = 0``, for two atoms at
    ``cond.deployed_current_pA``), so dwells last as long as they would in the main job (about 0.12 s on
    an S2 column at 50 pA and 1 barn). A dwell longer than ``max_samples`` ends without an event.

    Parameters
    ----------
    n_dwells : int
    cond : StreamConditions
    seed : int
        Seed of the dwells' random generator (specimens, nuisances, events, counts).
    min_event : int
        Samples before the earliest event (the triggers' baseline).
    tail : int
        Samples kept after the event.
    max_samples : int
        Longest dwell, samples.
    streams_per_patch : int
        Dwells drawn from one specimen patch before a new one is made.

    Returns
    -------
    Streams
    """
    rng = np.random.default_rng(seed)
    dt = cond.sample_time_us * 1e-6
    out = Streams([], np.empty(n_dwells, np.int64), [], np.empty(n_dwells), np.empty(n_dwells),
                  np.empty(n_dwells), cond.sample_time_us)
    patch = None
    for i in range(n_dwells):
        if i % streams_per_patch == 0:
            patch = _Patch(rng, cond.blur_sigma_A)
        cur_guess = cond.deployed_current_pA
        atoms = 2.0  # S2 targets dominate; the rate only sets how long dwells last
        rate = float(knockon_rate(0.0, electrons_per_second(cur_guess), cond.cross_section_barn,
                                  cond.probe_sigma_A)) * atoms
        ev = min_event + samples_to_next_ejection(rng, rate, dt)
        kind = "hop" if rng.random() < cond.hop_fraction else "eject"
        n = ev + tail
        if n > max_samples:
            ev, n, kind = NO_EVENT, max_samples, "none"
        counts, r0, drop, cur = _one_stream(patch, cond, rng, n, ev, kind, t0=0.0)
        out.counts.append(counts)
        out.event[i], out.rate0[i], out.drop[i], out.current_pA[i] = ev, r0, drop, cur
        out.kind.append(kind)
    return out


def check_dwells(n_dwells: int, length: int, seed: int, cond: StreamConditions | None = None,
                 event_fraction: float = 0.8) -> Streams:
    """Dwells of ``length`` samples from the moment the beam is unblanked, for sample-by-sample checks of a
    trigger implementation (the FPGA logic against the integer runtime).

    An event (an ejection, or a hop with ``cond.hop_fraction``) falls uniformly anywhere in the dwell but its
    last 64 samples in ``event_fraction`` of the dwells, so also within the first history, where only a
    trigger started with the dwell's expected rate can decide. The nuisances are ``cond``'s (default the
    training ranges, :class:`StreamConditions`: beam-current noise and trend, probe offset and drift,
    background, S1 targets). ``Streams.rate0`` is each dwell's expected rate at its first sample (what the
    frame's column intensity predicts).

    Raises
    ------
    ValueError
        ``length`` of 64 samples or fewer.
    """
    if length <= 64:
        raise ValueError(f"dwells must be longer than 64 samples, got {length}")
    return training_segments(n_dwells, length, (0, length - 64), event_fraction, cond or StreamConditions(), seed)


def save_dwells(streams: Streams, path, expected_rate: np.ndarray | None = None) -> None:
    """Write dwells as the ``.npz`` that ``beamloop fpga sim --stream`` reads (:class:`beamloop.fpga.ip_sim.Dwells`):
    ``counts`` (all dwells concatenated, uint16), ``offsets`` (n + 1 sample offsets), ``expected_rate``
    (counts per sample given at each dwell's start, NaN for none; default ``streams.rate0`` for every other
    dwell, starting with the second, and none for the others) and ``event`` (event sample or -1)."""
    n = len(streams)
    if expected_rate is None:
        expected_rate = np.where(np.arange(n) % 2 == 1, streams.rate0, np.nan)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in streams.counts])]).astype(np.int64)
    counts = np.concatenate(streams.counts).astype(np.uint16) if n else np.zeros(0, np.uint16)
    np.savez(path, counts=counts, offsets=offsets, expected_rate=np.asarray(expected_rate, np.float64),
             event=np.asarray(streams.event, np.int64))
