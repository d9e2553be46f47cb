"""Policies: which positions the beam visits next, chosen from a classified frame.

:class:`VacancyLinePolicy` writes a line of sulfur vacancies atom by atom (the kind of experiment
reported for MoS2 by e.g. Dyck et al., "Atom-by-atom fabrication with electron beams", Nat. Rev. Mater.
4, 497 (2019)): it picks the S2 columns along one S row of the lattice and parks the beam on each in turn
until the trigger sees one S atom leave (S2 -> S1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.frame.stage import StageBase

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext


@dataclass(frozen=True)
class Target:
    """A beam target: pixel position (``x_px`` column, ``y_px`` row), its fractions of the scan frame
    (``fx``, ``fy``), the frame it refers to, and the index of the column in the frame's table."""

    x_px: float
    y_px: float
    fx: float
    fy: float
    frame_id: int
    column: int


class VacancyLinePolicy(StageBase):
    """Frame stage ``policy``: choose the S2 columns along one lattice row through the middle of the field.

    Reads ``columns``, ``bonds``, ``scan`` and ``extras``; writes ``targets`` (empty without a scan frame,
    without bonds, when the frame's ``want_targets`` is false, or when the out-of-distribution stage raised
    its alarm, ``extras["ood"]``). Columns whose uncertainty (``extras["column_uncertainty"]``, when a stage
    wrote it) exceeds ``max_uncertainty`` are never targets.

    The row is fixed on the first frame (through the S column nearest the frame centre, along the S-S
    lattice vector closest to the fast axis) and kept in fractional coordinates for later frames, so
    written vacancies (now S1) are skipped and the line grows. On a path that registers its frames
    (:mod:`beamloop.edge.stages.register`, ``extras["drift"]``) the row moves with the specimen instead: its
    anchor is shifted by the displacement registered since the frame that fixed it; and while the drift
    estimate is uncertain (velocity standard deviation times ``drift_horizon_s`` over ``max_drift_sigma_A``)
    the frame gets no targets (an uncertainty gate: the probe would not land on them).

    Parameters
    ----------
    targets_per_frame : int
        Most targets returned per frame.
    line_width : float
        Columns within this fraction of the S-S distance from the row belong to it.
    edge_margin_px : float
        Columns closer to the frame edge are never targeted.
    max_uncertainty : float
        Columns with a higher per-column uncertainty are never targeted (the classical path's uncertainty is
        the detection threshold over the column's score: 0.5 = twice the threshold; the U-Net's is its
        ensemble uncertainty).
    max_drift_sigma_A : float
        Uncertainty gate of a registered path: largest predicted drift uncertainty over ``drift_horizon_s``, A.
    drift_horizon_s : float
        How far ahead the targets of a frame are visited, seconds (for the gate).
    """

    name = "policy"
    reads = ("columns", "bonds", "scan", "extras")
    writes = ("targets",)

    def __init__(self, targets_per_frame: int = 4, line_width: float = 0.3, edge_margin_px: float = 12.0,
                 max_uncertainty: float = 0.5, max_drift_sigma_A: float = 0.5, drift_horizon_s: float = 1.0) -> None:
        if targets_per_frame < 0:
            raise ValueError("targets_per_frame must be >= 0")
        self.max_uncertainty = float(max_uncertainty)
        self.targets_per_frame = int(targets_per_frame)
        self.line_width = float(line_width)
        self.edge_margin_px = float(edge_margin_px)
        self.max_drift_sigma_A = float(max_drift_sigma_A)
        self.drift_horizon_s = float(drift_horizon_s)
        self.anchor_frac: tuple[float, float] | None = None
        self.anchor_shift_px: tuple[float, float] | None = None
        self.direction_px: np.ndarray | None = None
        self.gated = 0

    def reset(self) -> None:
        """Forget the row (the next frame fixes a new one)."""
        self.anchor_frac = None
        self.anchor_shift_px = None
        self.direction_px = None

    def process(self, ctx: FrameContext) -> None:
        """``ctx.targets`` for this frame (:meth:`select`), or none."""
        ood = ctx.extras.get("ood")
        drift = ctx.extras.get("drift")
        if ctx.scan is None or not ctx.want_targets or (ood is not None and ood.get("alarm")):
            ctx.targets = []
        elif drift is not None and not (drift["velocity_sigma_A_per_s"] * self.drift_horizon_s
                                        <= self.max_drift_sigma_A):
            self.gated += 1
            drift["gated"] = True
            ctx.targets = []
        else:
            ctx.targets = self.select(ctx.columns, ctx.scan, ctx.bonds, ctx.extras.get("column_uncertainty"),
                                      None if drift is None else drift["displacement_px"])

    def select(self, cols: ColumnTable, scan: ScanFrame, bonds: np.ndarray | None,
               uncertainty: np.ndarray | None = None, shift_px: tuple[float, float] | None = None) -> list[Target]:
        """Targets for this frame.

        Parameters
        ----------
        cols : ColumnTable
            Classified columns (MoS2 classes).
        scan : ScanFrame
            The frame they were found in.
        bonds : ndarray (3, 2) or None
            Mo-S bond vectors in pixels (:func:`beamloop.edge.stages.vacancies.vacancy_sites`); none -> no targets.
        uncertainty : ndarray (n,), optional
            Per-column uncertainty; rows above ``max_uncertainty`` are left out (NaN rows are kept).
        shift_px : (dx, dy), optional
            The specimen's registered displacement in this frame, pixels (the row moves with it).
        """
        if bonds is None or len(cols) == 0 or self.targets_per_frame == 0:
            return []
        names = cols.class_names
        s2, s1 = names.index("S2"), names.index("S1")
        is_s = (cols.cls == s2) | (cols.cls == s1)
        xy = cols.xy
        if self.anchor_frac is None or self.direction_px is None:
            # the row is fixed only together with its anchor: a frame with bonds but no S column fixes neither
            cand = np.flatnonzero(is_s)
            if len(cand) == 0:
                return []
            lattice = np.array([bonds[0] - bonds[1], bonds[1] - bonds[2], bonds[2] - bonds[0]])
            d = lattice[np.argmax(np.abs(lattice[:, 0]) / np.hypot(lattice[:, 0], lattice[:, 1]))]
            centre = np.array([(scan.shape[1] - 1) / 2, (scan.shape[0] - 1) / 2])
            k = cand[np.argmin(np.hypot(*(xy[cand] - centre).T))]
            fx, fy = scan.fraction_of_pixel(xy[k, 0], xy[k, 1])
            self.direction_px = d / np.hypot(*d)
            self.anchor_frac = (float(fx), float(fy))
            self.anchor_shift_px = shift_px
        ax, ay = scan.pixel_of_fraction(*self.anchor_frac)
        if shift_px is not None and self.anchor_shift_px is not None:
            ax, ay = ax + shift_px[0] - self.anchor_shift_px[0], ay + shift_px[1] - self.anchor_shift_px[1]
        u = self.direction_px
        rel = xy - np.array([ax, ay])
        along = rel @ u
        across = rel @ np.array([-u[1], u[0]])
        spacing = math.sqrt(3.0) * float(np.median(np.hypot(bonds[:, 0], bonds[:, 1])))
        m = self.edge_margin_px
        ok = ((cols.cls == s2) & (np.abs(across) < self.line_width * spacing)
              & (xy[:, 0] >= m) & (xy[:, 0] <= scan.shape[1] - 1 - m)
              & (xy[:, 1] >= m) & (xy[:, 1] <= scan.shape[0] - 1 - m))
        if uncertainty is not None and len(uncertainty) == len(cols):
            ok &= ~(np.asarray(uncertainty) > self.max_uncertainty)
        idx = np.flatnonzero(ok)
        idx = idx[np.argsort(along[idx])][: self.targets_per_frame]
        out = []
        for k in idx:
            fx, fy = scan.fraction_of_pixel(xy[k, 0], xy[k, 1])
            out.append(Target(float(xy[k, 0]), float(xy[k, 1]), float(fx), float(fy), scan.frame_id, int(k)))
        return out
