"""Scoring found columns against ground truth: matching, recall, precision, RMS error, per class.

Found and true columns are matched one-to-one, closest pairs first, within a maximum distance
(0.5 Angstrom by default, as in ../shared/notes/atom-finding.md). Ground truth must be the column
positions moved by the smooth part of the scan distortion (see :mod:`beamloop.edge.sim.distortion`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree


def match(found_xy: np.ndarray, true_xy: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of found to true positions, closest pairs first.

    Parameters
    ----------
    found_xy, true_xy : ndarray, shape (n, 2) and (m, 2)
        Positions in the same units (pixels).
    max_distance : float
        Pairs farther apart are never matched (same units).

    Returns
    -------
    found_idx, true_idx : ndarray of int
        Indices of matched pairs.
    dist : ndarray of float
        Their distances.
    """
    found_xy = np.asarray(found_xy, float).reshape(-1, 2)
    true_xy = np.asarray(true_xy, float).reshape(-1, 2)
    if len(found_xy) == 0 or len(true_xy) == 0:
        e = np.zeros(0, int)
        return e, e, np.zeros(0)
    pairs = cKDTree(found_xy).sparse_distance_matrix(cKDTree(true_xy), max_distance, output_type="coo_matrix")
    order = np.argsort(pairs.data, kind="stable")
    used_f = np.zeros(len(found_xy), bool)
    used_t = np.zeros(len(true_xy), bool)
    fi, ti, dd = [], [], []
    for k in order:
        f, t = pairs.row[k], pairs.col[k]
        if not used_f[f] and not used_t[t]:
            used_f[f] = used_t[t] = True
            fi.append(f)
            ti.append(t)
            dd.append(pairs.data[k])
    # sparse_distance_matrix omits zero distances; recover exact coincidences
    if len(fi) < min(len(found_xy), len(true_xy)):
        d0, j0 = cKDTree(true_xy).query(found_xy, distance_upper_bound=1e-12)
        for f in np.flatnonzero(np.isfinite(d0)):
            t = j0[f]
            if not used_f[f] and not used_t[t]:
                used_f[f] = used_t[t] = True
                fi.append(f)
                ti.append(t)
                dd.append(0.0)
    return np.asarray(fi, int), np.asarray(ti, int), np.asarray(dd, float)


@dataclass
class Score:
    """Detection and localisation figures of one or more frames.

    Attributes
    ----------
    n_true, n_found, n_matched : int
    recall, precision : float
        ``n_matched / n_true`` and ``n_matched / n_found``.
    rms_pm : float
        Root-mean-square distance of matched pairs, picometres.
    per_class : dict
        For each class name: counts ``n_true``, ``n_found`` (found rows given that class),
        ``n_detected`` (true ones matched by any found row), ``n_correct`` (matched by a row of that
        class), ``sum_sq_pm2``; and the figures ``recall`` (detected / true), ``correct`` (correct /
        true), ``precision`` (correct / found) and ``rms_pm``.
    """

    n_true: int
    n_found: int
    n_matched: int
    recall: float
    precision: float
    rms_pm: float
    per_class: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain dict (JSON)."""
        return dict(self.__dict__)


def _inside(xy: np.ndarray, shape: tuple[int, int], margin_px: float) -> np.ndarray:
    return ((xy[:, 0] >= margin_px - 0.5) & (xy[:, 0] <= shape[1] - 0.5 - margin_px)
            & (xy[:, 1] >= margin_px - 0.5) & (xy[:, 1] <= shape[0] - 0.5 - margin_px))


def score_frame(found_xy: np.ndarray, found_cls: np.ndarray, true_xy: np.ndarray, true_cls: np.ndarray,
                class_names: tuple[str, ...], pixel_size_A: float, max_distance_A: float = 0.5,
                column_classes: tuple[str, ...] | None = None, frame_shape: tuple[int, int] | None = None,
                edge_margin_A: float = 0.5) -> Score:
    """Score one frame.

    Parameters
    ----------
    found_xy, true_xy : ndarray (n, 2), pixels
    found_cls, true_cls : ndarray (n,), int, indices into ``class_names``
    pixel_size_A : float
        Angstrom per pixel, to convert distances to picometres.
    max_distance_A : float
        Matching radius, Angstrom.
    column_classes : tuple of str, optional
        Classes that count as atomic columns for the overall recall/precision (default: every class
        but ``"vacancy"``). Vacancy sites are scored per class only.
    frame_shape : (rows, cols), optional
        When given, true columns closer than ``edge_margin_A`` to the frame's edge are left out (a column
        cut by the edge has no well-defined centre), and so are found columns there that match nothing.
    edge_margin_A : float
        Width of that strip, Angstrom.
    """
    found_xy = np.asarray(found_xy, float).reshape(-1, 2)
    true_xy = np.asarray(true_xy, float).reshape(-1, 2)
    found_cls, true_cls = np.asarray(found_cls), np.asarray(true_cls)
    if frame_shape is not None:
        m = edge_margin_A / pixel_size_A
        t_in = _inside(true_xy, frame_shape, m)
        f_keep = _inside(found_xy, frame_shape, m)
        afi, ati, _ = match(found_xy, true_xy, max_distance_A / pixel_size_A)
        f_keep[afi] = t_in[ati]  # a found column matched to a true one shares its fate
        found_xy, found_cls = found_xy[f_keep], found_cls[f_keep]
        true_xy, true_cls = true_xy[t_in], true_cls[t_in]
    column_classes = column_classes or tuple(c for c in class_names if c != "vacancy")
    col_ids = [class_names.index(c) for c in column_classes]
    f_is_col = np.isin(found_cls, col_ids) | (found_cls < 0)
    t_is_col = np.isin(true_cls, col_ids)
    fi, ti, d = match(found_xy[f_is_col], true_xy[t_is_col], max_distance_A / pixel_size_A)
    n_true, n_found = int(t_is_col.sum()), int(f_is_col.sum())
    rms = float(np.sqrt(np.mean(d**2)) * pixel_size_A * 100) if len(d) else float("nan")
    per = {}
    # per class over all classes (vacancy sites included), matching every found row
    afi, ati, ad = match(found_xy, true_xy, max_distance_A / pixel_size_A)
    for c, name in enumerate(class_names):
        sel = true_cls[ati] == c
        counts = {
            "n_true": int((true_cls == c).sum()),
            "n_found": int((found_cls == c).sum()),
            "n_detected": int(sel.sum()),
            "n_correct": int((found_cls[afi[sel]] == c).sum()),
            "sum_sq_pm2": float(np.sum((ad[sel] * pixel_size_A * 100) ** 2)),
        }
        if counts["n_true"] or counts["n_found"]:
            per[name] = _class_figures(counts)
    return Score(n_true, n_found, len(d), len(d) / max(n_true, 1), len(d) / max(n_found, 1), rms, per)


def _class_figures(c: dict) -> dict:
    """Add recall, correct (found and given the true class), precision and RMS to raw per-class counts."""
    out = dict(c)
    out["recall"] = c["n_detected"] / c["n_true"] if c["n_true"] else float("nan")
    out["correct"] = c["n_correct"] / c["n_true"] if c["n_true"] else float("nan")
    out["precision"] = c["n_correct"] / c["n_found"] if c["n_found"] else float("nan")
    out["rms_pm"] = float(np.sqrt(c["sum_sq_pm2"] / c["n_detected"])) if c["n_detected"] else float("nan")
    return out


def combine(scores: list[Score]) -> Score:
    """Pool several frames' scores (counts summed, RMS pooled by matched pairs)."""
    if not scores:
        return Score(0, 0, 0, float("nan"), float("nan"), float("nan"))
    nt = sum(s.n_true for s in scores)
    nf = sum(s.n_found for s in scores)
    nm = sum(s.n_matched for s in scores)
    ms = sum((s.rms_pm**2) * s.n_matched for s in scores if s.n_matched)
    keys = ("n_true", "n_found", "n_detected", "n_correct", "sum_sq_pm2")
    per: dict = {}
    for s in scores:
        for name, v in s.per_class.items():
            p = per.setdefault(name, dict.fromkeys(keys, 0))
            for k in keys:
                p[k] += v[k]
    out = {name: _class_figures(p) for name, p in per.items()}
    return Score(nt, nf, nm, nm / max(nt, 1), nm / max(nf, 1), float(np.sqrt(ms / nm)) if nm else float("nan"), out)
