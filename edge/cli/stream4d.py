"""``beamloop receive``, ``record`` and ``stream`` with edge's 4D-STEM features.

:mod:`beamloop.streams.cli` defines the detector-stream commands and imports nothing of :mod:`beamloop.edge`;
this module registers them with the two things it leaves to its caller: the live virtual images of
``receive --scan`` (:func:`live_imager`, :class:`beamloop.edge.analysis.live4d.LiveImager`) and the simulated
scan of ``stream sim4d`` (:func:`sim4d_frames`, :class:`beamloop.edge.sim.fourd.FourDMicroscope`). The edge
modules are imported when a command runs, not when the command line is built.
"""

from __future__ import annotations

import numpy as np

from beamloop.streams import cli as streams_cli

SIM4D_STEP_A = 0.2
"""Probe step of ``stream sim4d``, Angstrom."""


def live_imager(scan_shape: tuple[int, int], detector_shape: tuple[int, int], *, bf_radius: float | None = None,
                adf_radii: tuple[float, float] | None = None, centre: tuple[float, float] | None = None):
    """The live virtual BF / ADF / centre-of-mass images of ``receive --scan``.

    Parameters
    ----------
    scan_shape : (rows, cols)
        Probe positions of the scan; frame ``image_id`` is position ``image_id % (rows * cols)``, raster order.
    detector_shape : (rows, cols)
        Detector pixels of every frame.
    bf_radius : float, optional
        Virtual bright-field disk radius, detector pixels (default: a sixth of the smaller detector side).
    adf_radii : (inner, outer), optional
        Virtual annular dark-field radii, detector pixels (default: 1.25 x the BF radius to half the side).
    centre : (row, col), optional
        Beam centre, detector pixels (default: the middle of the detector).

    Returns
    -------
    beamloop.edge.analysis.live4d.LiveImager
        With images ``bf``, ``adf`` and the centre of mass (``com_row``, ``com_col``; radius 1.5 x BF).
    """
    from beamloop.edge.analysis import live4d

    rows, cols = detector_shape
    centre = tuple(centre) if centre else ((rows - 1) / 2, (cols - 1) / 2)
    half = min(detector_shape) / 2
    bf = bf_radius or half / 3
    rin, rout = adf_radii if adf_radii else (bf * 1.25, half)
    masks = {"bf": live4d.disk_mask(detector_shape, bf, centre),
             "adf": live4d.annulus_mask(detector_shape, rin, rout, centre)}
    return live4d.LiveImager(scan_shape, masks, com_centre=centre, com_radius=bf * 1.5)


def sim4d_frames(scan_shape: tuple[int, int], detector_px: int, electrons: float, seed: int) -> np.ndarray:
    """The frames of ``stream sim4d``: a simulated 4D-STEM scan of MoS2 with point defects.

    Parameters
    ----------
    scan_shape : (rows, cols)
        Probe positions, :data:`SIM4D_STEP_A` apart.
    detector_px : int
        Detector pixels per side; the bright-field disk has a radius of a sixth of it.
    electrons : float
        Mean electrons per probe position.
    seed : int
        Seed of the lattice defects and the shot noise; the same seed gives the same frames.

    Returns
    -------
    ndarray (rows * cols, detector_px, detector_px)
        Diffraction patterns in raster order, as :meth:`beamloop.edge.sim.fourd.FourDMicroscope.scan` makes them.
    """
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.sim import lattice
    from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope

    rng = np.random.default_rng(seed)
    rows, cols = scan_shape
    step = SIM4D_STEP_A
    spec = lattice.mos2((-rows * step, rows * step, -cols * step, cols * step))
    lattice.add_point_defects(spec, rng)
    cfg = FourDConfig(detector_shape=(detector_px, detector_px), disk_radius_px=detector_px / 6,
                      df_width_px=detector_px / 4)
    scan = ScanFrame(0, (rows, cols), (rows * step / 10, cols * step / 10))
    return FourDMicroscope(spec, cfg).scan(scan, electrons, rng).reshape(rows * cols, detector_px, detector_px)


def live_view(http: str, images, counters):
    """The live view of ``receive --scan --http`` (:func:`beamloop.edge.monitor.web.serve_live_images`): the
    virtual images and counters on a web page and ``/metrics``, loopback only.

    Raises
    ------
    ValueError
        ``http`` is not ``HOST:PORT`` on a loopback address (``receive`` has no keys to protect it).
    """
    from beamloop.edge.monitor.auth import parse_http
    from beamloop.edge.monitor.web import serve_live_images

    host, port = parse_http(http)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"receive --http {http}: only a loopback address (127.0.0.1) is served, without keys")
    return serve_live_images((host, port), images, counters)


def register(subparsers) -> None:
    """Add ``receive``, ``record`` and ``stream`` (:func:`beamloop.streams.cli.register`) with
    :func:`live_imager` and :func:`sim4d_frames`."""
    streams_cli.register(subparsers, live_imager=live_imager, sim4d_source=sim4d_frames, live_view=live_view)
