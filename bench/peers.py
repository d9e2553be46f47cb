"""The atom finders beamloop is measured against, each called the way its own documentation shows.

Every finder takes a frame (2-D array of detector counts or intensities, any real dtype) and returns an
``(n, 2)`` float64 array of column positions ``(x, y)`` in pixels (x the column index, y the row index),
the convention of :mod:`beamloop.edge.frame.columns`. Peers are benchmark-only dependencies (the ``beamloop.bench``
extra) and
are imported inside the functions.

Every free threshold is relative (a fraction of the frame's own dynamic range, of the brightest
feature, or of the typical feature mass), so that a value calibrated on simulated frames of one dose
(:func:`beamloop.bench.atomfinding.calibrate`) means the same on frames of another size and on real images.

- :func:`plm_com`: scikit-image ``peak_local_max`` on the Gaussian-smoothed frame, each peak refined by
  the centre of mass of the background-subtracted smoothed frame in a disc (vectorised, one pass).
- :func:`trackpy_locate`: ``trackpy.locate`` (Crocker-Grier: band-pass, local maxima, iterated centroid),
  J. C. Crocker, D. G. Grier, J. Colloid Interface Sci. 179, 298 (1996).
- :func:`atomap_find`: atomap ``get_atom_positions`` (``peak_local_max`` on the raw frame), optionally
  refined by ``Sublattice.refine_atom_positions_using_center_of_mass`` and then
  ``refine_atom_positions_using_2d_gaussian``: M. Nord et al., Adv. Struct. Chem. Imaging 3, 9 (2017).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

PEER_PACKAGES = {"plm_com": "skimage", "trackpy": "trackpy", "atomap_com": "atomap", "atomap_gauss": "atomap"}
"""Finder name -> the import it needs (a missing one skips that finder with a reason)."""


def _disc_offsets(radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer offsets ``(dy, dx)`` (each shape (m,), int64) of the pixels within ``radius_px`` of the origin."""
    r = int(math.ceil(radius_px))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dx * dx + dy * dy <= radius_px * radius_px
    return dy[inside].astype(np.int64), dx[inside].astype(np.int64)


def centre_of_mass(image: np.ndarray, peaks_rc: np.ndarray, radius_px: float, background: float = 0.0) -> np.ndarray:
    """Centre of mass of ``image - background`` (negative values clipped to 0) in a disc around each peak.

    Parameters
    ----------
    image : ndarray (rows, cols), float
    peaks_rc : ndarray (n, 2), int
        Peak pixels as ``(row, col)`` (the order ``peak_local_max`` returns).
    radius_px : float
        Disc radius, pixels; pixels outside the frame are left out.
    background : float
        Level subtracted before weighting (same units as ``image``).

    Returns
    -------
    ndarray (n, 2) float64: ``(x, y)`` pixels; a peak with no positive weight keeps its pixel position.
    """
    peaks_rc = np.asarray(peaks_rc, np.int64).reshape(-1, 2)
    dy, dx = _disc_offsets(radius_px)
    rr = peaks_rc[:, :1] + dy[None, :]
    cc = peaks_rc[:, 1:] + dx[None, :]
    ok = (rr >= 0) & (rr < image.shape[0]) & (cc >= 0) & (cc < image.shape[1])
    w = np.where(ok, image[np.clip(rr, 0, image.shape[0] - 1), np.clip(cc, 0, image.shape[1] - 1)] - background, 0.0)
    np.clip(w, 0.0, None, out=w)
    tot = w.sum(axis=1)
    safe = np.where(tot > 0, tot, 1.0)
    x = np.where(tot > 0, (w * cc).sum(axis=1) / safe, peaks_rc[:, 1])
    y = np.where(tot > 0, (w * rr).sum(axis=1) / safe, peaks_rc[:, 0])
    return np.stack([x, y], axis=1).astype(np.float64)


def plm_com(image: np.ndarray, sigma_px: float, min_distance_px: float, threshold: float = 0.15,
            com_radius_px: float | None = None) -> np.ndarray:
    """scikit-image ``peak_local_max`` + centre of mass (the baseline of ../shared/notes/atom-finding.md).

    The frame is smoothed with ``scipy.ndimage.gaussian_filter(sigma_px)``; the background is its 5th
    percentile; peaks at least ``min_distance_px`` apart (``peak_local_max``'s square-window rule) and
    higher than ``background + threshold * (p99.5 - background)`` are refined by :func:`centre_of_mass`
    of the smoothed frame within ``com_radius_px`` (default: ``min_distance_px / 2``).

    Parameters
    ----------
    image : ndarray (rows, cols), real
    sigma_px : float
        Smoothing sigma, pixels (about the column's own sigma).
    min_distance_px : float
        Minimum peak separation, pixels (rounded down, at least 1).
    threshold : float
        Relative height threshold in [0, 1].

    Returns
    -------
    ndarray (n, 2) float64, ``(x, y)`` pixels.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max

    s = gaussian_filter(np.asarray(image, np.float32), sigma_px)
    bg, top = np.percentile(s, [5, 99.5])
    thr = float(bg + threshold * (top - bg))
    md = max(int(min_distance_px), 1)
    peaks = peak_local_max(s, min_distance=md, threshold_abs=thr, exclude_border=False)
    return centre_of_mass(s, peaks, com_radius_px or max(md / 2, 1.0), float(bg))


def trackpy_diameter(sigma_px: float) -> int:
    """trackpy's feature ``diameter`` for a column of Gaussian sigma ``sigma_px``: the odd integer nearest
    to 4 sigma, at least 3 (trackpy requires an odd diameter that spans the feature)."""
    d = max(int(round(4.0 * sigma_px)), 3)
    return d if d % 2 else d + 1


def trackpy_locate(image: np.ndarray, sigma_px: float, min_distance_px: float, min_mass_fraction: float = 0.2
                   ) -> np.ndarray:
    """``trackpy.locate`` with diameter :func:`trackpy_diameter` and ``separation = min_distance_px``; features
    with a mass below ``min_mass_fraction`` times the 90th percentile of all masses are dropped (trackpy's
    ``minmass``, made relative). Returns ``(n, 2)`` float64 ``(x, y)`` pixels."""
    import trackpy

    trackpy.quiet()
    f = trackpy.locate(np.asarray(image, np.float32), trackpy_diameter(sigma_px), separation=max(min_distance_px, 1.0),
                       characterize=False, engine="numba")
    if len(f) == 0:
        return np.zeros((0, 2))
    mass = f["mass"].to_numpy()
    keep = mass >= min_mass_fraction * np.percentile(mass, 90)
    return np.stack([f["x"].to_numpy()[keep], f["y"].to_numpy()[keep]], axis=1).astype(np.float64)


def atomap_find(image: np.ndarray, min_distance_px: float, threshold_rel: float = 0.2, refine: str = "none"
                ) -> np.ndarray:
    """atomap: ``get_atom_positions(signal, separation, threshold_rel)`` on the raw frame, then optionally a
    ``Sublattice`` refined by centre of mass (``refine="com"``) or by centre of mass and then 2-D Gaussians
    (``refine="gauss"``), with atomap's default neighbour-distance masks.

    Parameters
    ----------
    image : ndarray (rows, cols), real
    min_distance_px : float
        atomap's ``separation`` (rounded down, at least 1), pixels.
    threshold_rel : float
        atomap's relative threshold (fraction of the frame's maximum).
    refine : {"none", "com", "gauss"}

    Returns
    -------
    ndarray (n, 2) float64, ``(x, y)`` pixels.

    Raises
    ------
    ValueError
        Unknown ``refine``.
    """
    if refine not in ("none", "com", "gauss"):
        raise ValueError(f"refine must be 'none', 'com' or 'gauss', got {refine!r}")
    data = np.asarray(image, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hyperspy's deprecation notices at import
        logging.getLogger("hyperspy").setLevel(logging.ERROR)
        import atomap.api as am
        import hyperspy.api as hs

        pos = am.get_atom_positions(hs.signals.Signal2D(data), separation=max(int(min_distance_px), 1),
                                    threshold_rel=threshold_rel)
        if refine == "none" or len(pos) < 4:
            return np.asarray(pos, np.float64).reshape(-1, 2)
        sub = am.Sublattice(pos, image=data)
        sub.find_nearest_neighbors()
        sub.refine_atom_positions_using_center_of_mass(show_progressbar=False)
        if refine == "gauss":
            sub.refine_atom_positions_using_2d_gaussian(show_progressbar=False)
        return np.stack([np.asarray(sub.x_position, float), np.asarray(sub.y_position, float)], axis=1)


def available(name: str) -> str | None:
    """None when the peer ``name`` (a key of :data:`PEER_PACKAGES`) can run here, else the reason it cannot."""
    import importlib

    mod = PEER_PACKAGES[name]
    try:
        importlib.import_module(mod)
    except ImportError as exc:
        return f"{mod} is not installed ({exc}); install the 'bench' extra"
    return None
