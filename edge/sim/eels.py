"""Core-loss EELS of the simulated specimens: point spectra whose fine structure follows the local structure.

Model (phenomenological; shapes after R. F. Egerton, *Electron Energy-Loss Spectroscopy in the Electron
Microscope*, 3rd ed., Springer 2011, ch. 3.6 and 4.4), per probe position, in fractions of the probe
electrons per eV:

- **background** ``b0 (E / E_ref)^-r`` (the power law of Egerton sec. 4.4.2, from the valence losses and the
  tails of lower edges), ``E_ref`` the spectrometer's first channel;
- **edges**, one term per atom near the probe: an atom of column ``k`` at distance ``d`` from the probe
  contributes with weight ``exp(-d^2 / 2 s^2)`` (``s``: the probe's width including the delocalisation of
  the inelastic scattering: 1.0 Angstrom for MoS2's 165-230 eV edges, 0.8 Angstrom for SrTiO3's 456-532 eV
  ones; Egerton's d50 at 200 kV is several Angstrom at 165 eV, so these are on the sharp side) an edge of
  one of three shapes:

  ``sawtooth``   a K or L2,3 edge of a light element: a step at the onset (and at ``+ spin_orbit_eV`` with
                 half the height, L2 after L3) decaying as ``(E / E_onset)^-decay`` (the hydrogenic shape,
                 Egerton sec. 3.6.1), with optional near-edge peaks (ELNES);
  ``white_lines``  the L2,3 edge of a 3d transition metal: Lorentzian L3 and L2 lines on a double-step
                 continuum of heights 2:1 (Pearson, Ahn & Fultz, Phys. Rev. B 47, 8471 (1993));
  ``delayed``    an M4,5 edge of a 4d element: a delayed maximum ``x^2 / (x^2 + w^2)`` of the energy above the
                 onset ``x``, then ``(E / E_onset)^-decay`` (Egerton sec. 3.7.2, fig. 3.33);

- **local structure**: every column gets a coordination deficit ``delta`` in [0, 1], ``1 - S_k / S_ref`` with
  ``S_k`` the atoms in the column and its neighbours (Gaussian weights of width one nearest-neighbour distance,
  within 1.9 of them: the shell at exactly two, present in both 2H MoS2 and SrTiO3 [001], is left out rather than
  split by rounding) and ``S_ref`` the median of ``S_k`` over columns of its sublattice, i.e. of the perfect
  crystal. Near a vacancy, or at a grain boundary where neighbours are missing or too far, ``delta > 0``. Its edges
  respond through ``f(delta) = 1 - exp(-delta / 0.08)``: the onset moves by ``shift_eV * f`` (a chemical shift;
  negative: towards lower energy, as for reduced Ti at O vacancies in SrTiO3, Ti3+ against Ti4+), the L3/L2 ratio
  changes by ``ratio_change * f``, near-edge peaks lose ``peak_loss * f`` of their height.
- **spectrometer**: channels of ``dispersion_eV`` from ``offset_eV``; the model is evaluated on a grid four
  times finer, convolved with a Gaussian of ``resolution_eV`` full width at half maximum (the zero-loss
  peak's width) and summed into channels; Poisson counts of ``electrons`` probe electrons per spectrum.

The *true property map* is what this model gives without noise: :meth:`EELSModel.expected` at any probe
position, and :meth:`EELSModel.fine_structure` (the atom-weighted mean onset shift and ratio under the
probe). The edge energies and windows are those of :data:`beamloop.edge.analysis.scalarize.EDGES`, so the
scalarizers of :mod:`beamloop.edge.analysis.scalarize` measure what is simulated here.

Limits: no multiple scattering (plural-scattering deconvolution is not needed for the single-scattering
model), no low-loss region or zero-loss peak in the window, edge strengths are set for plausible jump
ratios (2-10), not computed from generalised oscillator strengths (exspy's hydrogenic GOS covers K and L
shells but not Mo M4,5, and its Hartree-Slater and GOSH tables are not shipped with it), and the fine
structure is a two-parameter caricature of ELNES, not a calculation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial import cKDTree

from beamloop.edge.analysis.scalarize import EDGES, energy_axis
from beamloop.edge.sim import lattice

NEIGHBOUR_RADIUS = 1.9
"""Neighbours counted in the coordination, nearest-neighbour distances (below the shell at exactly 2)."""

RESPONSE_SCALE = 0.08
"""Deficit at which the fine structure has changed by 1 - 1/e of its full response (``f(delta)``)."""


@dataclass(frozen=True)
class EdgeModel:
    """One core-loss edge of one element (see the module docstring for the shapes).

    Attributes
    ----------
    name : str
        Key of :data:`beamloop.edge.analysis.scalarize.EDGES` (its onset and spin-orbit splitting).
    element : str
        Element whose atoms give the edge.
    shape : {"sawtooth", "white_lines", "delayed"}
    strength : float
        Edge height per atom at the onset (sawtooth: the step; white_lines: the continuum step; delayed: the
        asymptote of the delayed rise), fraction of probe electrons per eV, for a probe on the atom.
    decay : float
        Exponent of the post-edge decay ``(E / E_onset)^-decay``.
    peaks : tuple of (float, float, float)
        Near-edge peaks ``(energy above onset eV, half width eV, height relative to strength)``.
    ratio : float
        L3/L2 intensity ratio of the white lines (statistical: 2).
    line_height : float
        Height of the L3 line relative to the step (white_lines).
    line_width_eV : float
        Lorentzian half width of the lines, eV.
    delay_eV : float
        Width ``w`` of the delayed rise, eV.
    shift_eV : float
        Onset shift at full response (``f = 1``), eV.
    ratio_change : float
        Change of ``ratio`` at full response.
    peak_loss : float
        Fraction of the near-edge peaks lost at full response.
    """

    name: str
    element: str
    shape: str
    strength: float
    decay: float = 3.0
    peaks: tuple[tuple[float, float, float], ...] = ()
    ratio: float = 2.0
    line_height: float = 4.0
    line_width_eV: float = 0.6
    delay_eV: float = 8.0
    shift_eV: float = 0.0
    ratio_change: float = 0.0
    peak_loss: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in ("sawtooth", "white_lines", "delayed"):
            raise ValueError(f"edge shape must be sawtooth, white_lines or delayed, got {self.shape!r}")
        if self.name not in EDGES:
            raise ValueError(f"unknown edge {self.name!r}; known: {', '.join(sorted(EDGES))}")

    @property
    def onset_eV(self) -> float:
        """Nominal onset, eV."""
        return EDGES[self.name].onset_eV

    @property
    def spin_orbit_eV(self) -> float:
        """L3-L2 (M5-M4) splitting, eV."""
        return EDGES[self.name].spin_orbit_eV

    def cross_section(self, e: np.ndarray, response: np.ndarray) -> np.ndarray:
        """Edge per atom, fraction per eV, at energies ``e`` (eV, shape (m,)) for responses ``f`` (shape (n,)).

        Returns ndarray, shape (n, m), float64.
        """
        f = np.asarray(response, np.float64)[:, None]
        e0 = self.onset_eV + self.shift_eV * f
        x = e[None, :] - e0
        decay = np.where(x > 0, (np.maximum(e[None, :], 1e-9) / e0) ** -self.decay, 0.0)
        so = self.spin_orbit_eV
        soft = 0.15  # eV: the step's own width, below the resolution
        step = lambda dx: 0.5 * (1.0 + np.tanh(dx / soft))  # noqa: E731
        if self.shape == "sawtooth":
            out = step(x) * (e[None, :] / np.maximum(e0, 1e-9)) ** -self.decay
            if so > 0:
                out = (2 * out + step(x - so) * (e[None, :] / (e0 + so)) ** -self.decay) / 3.0
            for de, hw, h in self.peaks:
                out = out + h * (1 - self.peak_loss * f) * hw**2 / ((x - de) ** 2 + hw**2) * step(x + 2 * hw)
            return self.strength * out
        if self.shape == "delayed":
            xp = np.maximum(x, 0.0)
            return self.strength * (xp**2 / (xp**2 + self.delay_eV**2)) * np.where(x > 0, decay, 0.0)
        # white lines: L3 at onset + 1.5 eV, L2 one spin-orbit splitting above, on a 2:1 double step
        r = self.ratio + self.ratio_change * f
        l3 = x - 1.5
        l2 = x - 1.5 - so
        cont = (2 * step(l3) + step(l2)) / 3.0 * np.where(l3 > -1.0, (np.maximum(e[None, :], 1e-9) / e0) ** -self.decay,
                                                          1.0)
        w = self.line_width_eV
        lor = lambda dx: w**2 / (dx**2 + w**2)  # noqa: E731
        h3 = self.line_height
        h2 = h3 / r
        return self.strength * (cont + h3 * lor(l3) + h2 * lor(l2))


@dataclass(frozen=True)
class Spectrometer:
    """An EELS spectrometer's energy axis and resolution.

    Attributes
    ----------
    offset_eV : float
        Energy of channel 0's centre, eV.
    dispersion_eV : float
        eV per channel.
    channels : int
    resolution_eV : float
        Full width at half maximum of the zero-loss peak (a Gaussian), eV.
    """

    offset_eV: float = 130.0
    dispersion_eV: float = 0.25
    channels: int = 512
    resolution_eV: float = 0.8

    def __post_init__(self) -> None:
        if not (isinstance(self.channels, int) and 8 <= self.channels <= 16384):
            raise ValueError(f"channels must be a whole number in [8, 16384], got {self.channels!r}")
        if not (self.offset_eV > 0 and 0 < self.dispersion_eV <= 10 and 0 < self.resolution_eV <= 20):
            raise ValueError("offset_eV must be > 0, dispersion_eV in (0, 10], resolution_eV in (0, 20]; got "
                             f"{self.offset_eV}, {self.dispersion_eV}, {self.resolution_eV}")

    @property
    def energy_eV(self) -> np.ndarray:
        """Channel centres, (channels,) float64, eV."""
        return energy_axis(self.channels, self.offset_eV, self.dispersion_eV)

    def as_dict(self) -> dict:
        """The calibration as plain numbers (for a run file or a stream header)."""
        return {"offset_eV": self.offset_eV, "dispersion_eV": self.dispersion_eV, "channels": self.channels,
                "resolution_eV": self.resolution_eV}


@dataclass(frozen=True)
class EELSMaterial:
    """The EELS of one material: its edges, background and spectrometer setting.

    Attributes
    ----------
    name : str
    edges : tuple of EdgeModel
    spectrometer : Spectrometer
    background : float
        ``b0``: background at the first channel, fraction of probe electrons per eV.
    background_exponent : float
        ``r`` of the power law.
    probe_sigma_A : float
        Width of the inelastic probe (with delocalisation), Angstrom.
    """

    name: str
    edges: tuple[EdgeModel, ...]
    spectrometer: Spectrometer
    background: float
    background_exponent: float
    probe_sigma_A: float = 0.7


MATERIALS: dict[str, EELSMaterial] = {
    "MoS2": EELSMaterial(
        "MoS2",
        (EdgeModel("S_L2,3", "S", "sawtooth", 2.5e-5, decay=2.5, peaks=((2.5, 1.2, 0.6),), shift_eV=-1.6,
                   peak_loss=0.6),
         EdgeModel("Mo_M4,5", "Mo", "delayed", 4e-5, decay=2.0, delay_eV=10.0, shift_eV=-1.0)),
        Spectrometer(130.0, 0.25, 512, 0.8), background=4e-5, background_exponent=3.0, probe_sigma_A=1.0),
    "SrTiO3": EELSMaterial(
        "SrTiO3",
        (EdgeModel("Ti_L2,3", "Ti", "white_lines", 1e-6, decay=2.5, ratio=0.85, line_height=6.0,
                   line_width_eV=0.7, shift_eV=-1.2, ratio_change=0.5),
         EdgeModel("O_K", "O", "sawtooth", 5e-7, decay=2.5, peaks=((1.5, 1.0, 1.5), (8.0, 3.0, 0.8)),
                   shift_eV=-0.6, peak_loss=0.7)),
        Spectrometer(400.0, 0.25, 768, 0.8), background=2.5e-5, background_exponent=3.5, probe_sigma_A=0.8),
}
"""EELS settings of the simulated materials (edge strengths per atom: SrTiO3 columns hold many atoms).

SrTiO3: a Ti L2,3 cross-section of ~1e-20 cm^2 (1e-4 Angstrom^2) over ~50 eV for ten Ti atoms under a probe
of ~2 Angstrom^2 gives ~1e-5 of the electrons per eV, i.e. ~1e-6 per atom (Egerton 2011, sec. 3.6 and 4.5),
with a jump ratio of ~3 at the Ti-O columns."""

DEFAULT_ELECTRONS: dict[str, float] = {"MoS2": 1e7, "SrTiO3": 1e8}
"""Probe electrons per point spectrum by material (1e7: 32 ms at 50 pA; 1e8: 0.32 s): enough counts for an
onset or integral to a few tenths of an eV or percent on the simulated edges."""


def coordination_deficit(specimen: lattice.Specimen) -> np.ndarray:
    """Coordination deficit of every column, in [0, 1] (module docstring).

    ``S_k`` is the atoms of column ``k`` plus those of its neighbours within 1.9 nearest-neighbour
    distances ``a`` (weights ``exp(-d^2 / 2 a^2)``); ``S_ref`` of a sublattice is the median ``S_k`` of its columns away
    from the specimen's edge with every column filled as in the perfect crystal (each element's largest count
    on the column's sublattice). A vacancy lowers ``S_k`` of its neighbours; a grain boundary, where
    neighbours are missing or farther than in the crystal, too.

    Returns
    -------
    ndarray, shape (n,), float64
    """
    xy = specimen.xy
    nn = specimen.nn_distance_A
    pairs = cKDTree(xy).query_pairs(NEIGHBOUR_RADIUS * nn, output_type="ndarray")
    d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
    w = np.exp(-(d**2) / (2 * nn**2))

    def neighbourhood(atoms: np.ndarray) -> np.ndarray:
        s = atoms.astype(np.float64)
        np.add.at(s, pairs[:, 0], w * atoms[pairs[:, 1]])
        np.add.at(s, pairs[:, 1], w * atoms[pairs[:, 0]])
        return s

    perfect = np.zeros(len(xy))
    for site in np.unique(specimen.site):
        m = specimen.site == site
        perfect[m] = specimen.counts[m].max(axis=0).sum()
    s_now = neighbourhood(specimen.counts.sum(axis=1))
    s_perfect = neighbourhood(perfect)
    inner = _interior(xy, 2.5 * nn)
    reference = np.empty(len(xy))
    for site in np.unique(specimen.site):
        m = specimen.site == site
        reference[m] = np.median(s_perfect[m & inner] if (m & inner).any() else s_perfect[m])
    return np.clip(1.0 - s_now / np.maximum(reference, 1e-12), 0.0, 1.0)


def _interior(xy: np.ndarray, margin: float) -> np.ndarray:
    lo, hi = xy.min(0) + margin, xy.max(0) - margin
    return ((xy >= lo) & (xy <= hi)).all(axis=1)


def response(deficit: np.ndarray) -> np.ndarray:
    """``f(delta) = 1 - exp(-delta / RESPONSE_SCALE)``, the fine structure's response to a deficit."""
    return 1.0 - np.exp(-np.asarray(deficit, np.float64) / RESPONSE_SCALE)


class EELSModel:
    """Core-loss spectra of a specimen at arbitrary probe positions.

    Parameters
    ----------
    specimen : Specimen
        Read at every call (its ``counts`` may change as atoms are ejected; the coordination is computed
        again when they did).
    material : str or EELSMaterial
        A key of :data:`MATERIALS` or settings of one.
    spectrometer : Spectrometer, optional
        Overrides the material's.

    Raises
    ------
    KeyError
        Unknown material, or an edge's element not in the specimen.
    """

    def __init__(self, specimen: lattice.Specimen, material: str | EELSMaterial = "MoS2",
                 spectrometer: Spectrometer | None = None) -> None:
        mat = MATERIALS[material] if isinstance(material, str) else material
        if spectrometer is not None:
            mat = replace(mat, spectrometer=spectrometer)
        for edge in mat.edges:
            if edge.element not in specimen.elements:
                raise KeyError(f"edge {edge.name} needs element {edge.element!r}, not in {specimen.elements}")
        self.specimen = specimen
        self.material = mat
        self.spectrometer = mat.spectrometer
        self._tree = cKDTree(specimen.xy)
        self._counts_seen: np.ndarray | None = None
        self._deficit = np.zeros(len(specimen))

    @property
    def deficit(self) -> np.ndarray:
        """Coordination deficit of every column (recomputed when the specimen's counts changed)."""
        c = self.specimen.counts
        if self._counts_seen is None or not np.array_equal(self._counts_seen, c):
            self._deficit = coordination_deficit(self.specimen)
            self._counts_seen = c.copy()
        return self._deficit

    def _near(self, x_A: np.ndarray, y_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Columns within 3 probe sigmas: indices (n, K) (-1: none) and weights (n, K)."""
        s = self.material.probe_sigma_A
        pts = np.stack([np.asarray(x_A, np.float64).ravel(), np.asarray(y_A, np.float64).ravel()], 1)
        if not np.isfinite(pts).all():
            raise ValueError("probe positions must be finite")
        lists = self._tree.query_ball_point(pts, 3.0 * s)
        k = max((len(v) for v in lists), default=0)
        idx = np.full((len(pts), max(k, 1)), -1, np.int64)
        for i, v in enumerate(lists):
            idx[i, :len(v)] = v
        xy = self.specimen.xy[np.maximum(idx, 0)]
        d2 = (xy[..., 0] - pts[:, 0:1]) ** 2 + (xy[..., 1] - pts[:, 1:2]) ** 2
        w = np.where(idx >= 0, np.exp(-d2 / (2 * s * s)), 0.0)
        return idx, w

    def fine_structure(self, x_A: np.ndarray, y_A: np.ndarray) -> dict[str, np.ndarray]:
        """The true local parameters under the probe, per edge.

        Returns
        -------
        dict
            ``"<edge>_shift_eV"`` (n,): the atom-weighted mean onset shift, eV; ``"<edge>_ratio"`` (n,) for
            white lines; ``"<edge>_atoms"`` (n,): the probe-weighted atoms of that element; ``"deficit"`` (n,):
            the atom-weighted mean coordination deficit of all atoms under the probe.
        """
        idx, w = self._near(x_A, y_A)
        dfc = self.deficit[np.maximum(idx, 0)]
        f = response(dfc)
        out: dict[str, np.ndarray] = {}
        tot = np.zeros(len(idx))
        tot_w = np.zeros(len(idx))
        for edge in self.material.edges:
            n_el = self.specimen.counts[np.maximum(idx, 0), self.specimen.elements.index(edge.element)] * w
            a = n_el.sum(1)
            safe = np.where(a > 0, a, 1.0)
            out[f"{edge.name}_atoms"] = a
            out[f"{edge.name}_shift_eV"] = (n_el * edge.shift_eV * f).sum(1) / safe
            if edge.shape == "white_lines":
                out[f"{edge.name}_ratio"] = (n_el * (edge.ratio + edge.ratio_change * f)).sum(1) / safe
            tot += (n_el * dfc).sum(1)
            tot_w += a
        out["deficit"] = tot / np.where(tot_w > 0, tot_w, 1.0)
        return out

    def expected(self, x_A: np.ndarray, y_A: np.ndarray) -> np.ndarray:
        """Expected spectrum per probe electron at each position: fraction of electrons per channel.

        Parameters
        ----------
        x_A, y_A : ndarray, shape (n,), float
            Probe positions, specimen coordinates, Angstrom.

        Returns
        -------
        ndarray, shape (n, channels), float64
        """
        sp = self.spectrometer
        fine = 4
        e = sp.offset_eV + sp.dispersion_eV * ((np.arange(sp.channels * fine) + 0.5) / fine - 0.5)
        idx, w = self._near(x_A, y_A)
        n, kmax = idx.shape
        f = response(self.deficit[np.maximum(idx, 0)])
        m = self.material
        model = np.broadcast_to(m.background * (e / sp.offset_eV) ** -m.background_exponent, (n, len(e))).copy()
        for edge in m.edges:
            el = self.specimen.elements.index(edge.element)
            n_el = self.specimen.counts[np.maximum(idx, 0), el] * w
            for k in range(kmax):
                a = n_el[:, k]
                hit = np.flatnonzero(a > 0)
                if len(hit):
                    model[hit] += a[hit, None] * edge.cross_section(e, f[hit, k])
        sigma = sp.resolution_eV / (2 * math.sqrt(2 * math.log(2))) / (sp.dispersion_eV / fine)
        model = gaussian_filter1d(model, sigma, axis=1, mode="nearest")
        return model.reshape(n, sp.channels, fine).mean(axis=2) * sp.dispersion_eV

    def spectra(self, x_A: np.ndarray, y_A: np.ndarray, electrons: float, rng: np.random.Generator,
                dtype=np.uint32) -> np.ndarray:
        """Poisson counts of ``electrons`` probe electrons per position.

        Returns
        -------
        ndarray, shape (n, channels), ``dtype`` (counts, clipped to its maximum)

        Raises
        ------
        ValueError
            Non-positive or non-finite ``electrons``.
        """
        if not (electrons > 0 and math.isfinite(electrons)):
            raise ValueError(f"electrons per spectrum must be positive and finite, got {electrons}")
        lam = self.expected(x_A, y_A) * electrons
        return np.minimum(rng.poisson(lam), np.iinfo(dtype).max).astype(dtype)


@dataclass
class SpectrumPoint:
    """A spectrum with its calibration, as a point measurement carries it.

    Attributes
    ----------
    counts : ndarray, shape (channels,)
        Counts per channel.
    spectrometer : Spectrometer
    electrons : float
        Probe electrons of the measurement.
    """

    counts: np.ndarray
    spectrometer: Spectrometer = field(default_factory=Spectrometer)
    electrons: float = 0.0
