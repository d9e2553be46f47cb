"""The stages a frame goes through, in order. Start reading here.

=============  =====================================================  ==========================
stage          what it does                                           where
=============  =====================================================  ==========================
receive        read the message from the detector stream into a       :class:`beamloop.streams.native.receiver.FrameReceiver`
               preallocated ring buffer
decode         validate the header, decompress LZ4 blobs              :mod:`beamloop.streams.native.protocol`
preprocess     float32 conversion, Gaussian smoothing, noise sigma    :class:`beamloop.edge.stages.preprocess.Preprocessor`
find           local maxima, minimum separation, sub-pixel centres    :class:`beamloop.edge.stages.find.ColumnFinder`
               (or the U-Net ensemble on ONNX Runtime, ``method="unet"``)  :class:`beamloop.edge.stages.unet.UNetFinder`
classify       Mo / S2 / S1 / vacancy site (MoS2), or "column"        :mod:`beamloop.edge.stages.classify`
policy         choose beam targets (e.g. S2 columns along a line)     :class:`beamloop.edge.stages.policy.VacancyLinePolicy`
bridge         park the probe, unblank, blank (request/reply)         :class:`beamloop.edge.control.bridge.BridgeClient`
trigger        watch the parked-probe ADF stream; blank on ejection   :mod:`beamloop.edge.trigger.classical`
=============  =====================================================  ==========================

:class:`FramePipeline` runs preprocess -> find -> classify -> policy on one frame; the service
(:class:`beamloop.edge.service.EdgeService`) runs receive and decode before it, and bridge and trigger after it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from beamloop.edge.stages.classify import GenericClassifier, MoS2Classifier
from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.stages.find import ColumnFinder, FinderConfig
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.stages.policy import Target, VacancyLinePolicy
from beamloop.edge.stages.preprocess import FrameError
from beamloop.edge.frame.scanframe import ScanFrame

MOS2_SPACING_A = 1.824
"""Projected Mo-S distance of MoS2, Angstrom (a / sqrt(3), a = 3.16 Angstrom)."""

METHODS = ("classical", "unet")
"""Column finders the pipeline (and ``beamloop find --method``) offers."""


@dataclass
class FrameResult:
    """What the pipeline made of one frame.

    Attributes
    ----------
    columns : ColumnTable
        Classified columns (and inferred vacancy sites).
    targets : list of Target
        Beam targets chosen by the policy (empty without a policy or a scan frame).
    bonds : ndarray (3, 2) or None
        Mo-S bond vectors in pixels (MoS2 only).
    timings_ns : dict
        Duration of each stage run here.
    segment : beamloop.edge.stages.unet.SegmentResult or None
        With ``method="unet"``: heat maps, per-pixel and per-column uncertainty (rows of ``segment.columns``
        are the first rows of ``columns``; inferred vacancy sites follow them).
    """

    columns: ColumnTable
    targets: list[Target] = field(default_factory=list)
    bonds: np.ndarray | None = None
    timings_ns: dict = field(default_factory=dict)
    segment: object | None = None


class FramePipeline:
    """Preprocess, find, classify and choose targets for one frame.

    Parameters
    ----------
    material : {"MoS2", "generic"}
        Selects the classifier (and the physical scale when the pixel size is known).
    policy : VacancyLinePolicy, optional
        Chooses targets; none -> no targets.
    latency : LatencyRecorder, optional
        Receives the stage durations.
    finder_config : FinderConfig, optional
        Fixed finder parameters; by default they follow the pixel size (MoS2 scale), or, for frames
        without one, the lattice period and column size estimated from the first such frame.
    method : {"classical", "unet"}
        ``classical``: :class:`beamloop.edge.stages.find.ColumnFinder` and the intensity classifier. ``unet``: the U-Net
        ensemble (:class:`beamloop.edge.stages.unet.UNetFinder`) finds and classifies; vacancy sites (MoS2) are still
        inferred from the lattice.
    unet : beamloop.edge.stages.unet.UNetFinder, optional
        The learned finder to use (``method="unet"``); by default the shipped FP32 model on the best device.
    """

    def __init__(self, material: str = "MoS2", policy: VacancyLinePolicy | None = None,
                 latency: LatencyRecorder | None = None, finder_config: FinderConfig | None = None,
                 method: str = "classical", unet=None) -> None:
        if material not in ("MoS2", "generic"):
            raise ValueError(f"material must be 'MoS2' or 'generic', got {material!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.material = material
        self.policy = policy
        self.latency = latency
        self.method = method
        self._fixed = finder_config
        self._finders: dict[float, ColumnFinder] = {}
        self._classifiers: dict[float, object] = {}
        self.unet = unet
        if method == "unet" and unet is None:
            from beamloop.edge.stages.unet import UNetFinder

            self.unet = UNetFinder()

    def finder_for(self, pixel_size_A: float | None, image: np.ndarray | None = None) -> ColumnFinder:
        """The finder for frames of this pixel size (cached; MoS2 scale unless a config was given).

        Frames with no pixel size and no fixed configuration: the lattice period and column size are
        estimated from ``image`` (:func:`beamloop.edge.batch_find.finder_config`), and that finder serves all later
        frames without a pixel size.

        Raises
        ------
        beamloop.edge.stages.preprocess.FrameError
            The scale of ``image`` cannot be estimated (flat, too small, no lattice period).
        ValueError
            No pixel size, no fixed configuration and no image.
        """
        key = float(pixel_size_A) if pixel_size_A else 0.0
        f = self._finders.get(key)
        if f is None:
            if self._fixed is not None:
                cfg = self._fixed
            elif pixel_size_A and math.isfinite(pixel_size_A):
                cfg = FinderConfig.for_pixel_size(pixel_size_A, spacing_A=MOS2_SPACING_A)
            elif image is not None:
                from beamloop.edge.batch_find import finder_config

                try:
                    cfg = finder_config(image, None, self.material)
                except ValueError as exc:
                    raise FrameError(f"frame has no pixel size and its lattice scale cannot be estimated: {exc}"
                                     ) from None
            else:
                raise ValueError("frame has no pixel size; pass a finder configuration (column spacing)")
            f = self._finders[key] = ColumnFinder(cfg)
        return f

    def _classifier(self, pixel_size_A: float | None, finder: ColumnFinder):
        key = float(pixel_size_A) if pixel_size_A else 0.0
        c = self._classifiers.get(key)
        if c is None:
            if self.material == "MoS2":
                spacing = MOS2_SPACING_A / pixel_size_A if pixel_size_A else finder.config.min_distance_px / 0.55
                c = MoS2Classifier(spacing)
            else:
                c = GenericClassifier()
            self._classifiers[key] = c
        return c

    def process(self, image: np.ndarray, pixel_size_A: float | None = None, scan: ScanFrame | None = None
                ) -> FrameResult:
        """Run preprocess -> find -> classify -> policy on one frame.

        Parameters
        ----------
        image : ndarray (rows, cols), integer or float
        pixel_size_A : float, optional
            Angstrom per pixel (from the stream's ``start`` message or the file).
        scan : ScanFrame, optional
            The scan frame the image belongs to; needed for targets.

        Raises
        ------
        beamloop.edge.stages.preprocess.FrameError
            Bad frame (not 2-D, too small, non-finite pixels), or no pixel size and no estimable scale.
        """
        if self.method == "unet":
            return self._process_unet(image, pixel_size_A, scan)
        finder = self.finder_for(pixel_size_A, image)
        clf = self._classifier(pixel_size_A, finder)
        t = [time.perf_counter_ns()]
        smooth, noise = finder.preprocessor.run(image)
        t.append(time.perf_counter_ns())
        cols = finder.find_smoothed(smooth, noise)
        t.append(time.perf_counter_ns())
        cols = clf.classify(cols, smooth)
        t.append(time.perf_counter_ns())
        bonds = getattr(clf, "last_bonds", None)
        targets = self.policy.select(cols, scan, bonds) if (self.policy is not None and scan is not None) else []
        t.append(time.perf_counter_ns())
        return self._result(cols, targets, bonds, dict(zip(("preprocess", "find", "classify", "policy"),
                                                            np.diff(t).tolist())))

    def _result(self, cols: ColumnTable, targets, bonds, timings: dict, segment=None) -> FrameResult:
        if self.latency is not None:
            for stage, ns in timings.items():
                self.latency.add(stage, ns)
        return FrameResult(cols, targets, bonds, timings, segment)

    def _process_unet(self, image: np.ndarray, pixel_size_A: float | None, scan: ScanFrame | None) -> FrameResult:
        """The learned path: U-Net find and classify, then (MoS2) vacancy sites from the lattice, then policy."""
        seg = self.unet.find(image, self.material)
        t = [time.perf_counter_ns()]
        cols, bonds = seg.columns, None
        if self.material == "MoS2" and len(cols) >= 4:
            spacing = MOS2_SPACING_A / pixel_size_A if pixel_size_A else _median_neighbour_px(cols.xy)
            clf = MoS2Classifier(spacing)
            cols = cols.concat(clf._vacancy_sites(cols, image))
            bonds = clf.last_bonds
        t.append(time.perf_counter_ns())
        targets = self.policy.select(cols, scan, bonds) if (self.policy is not None and scan is not None) else []
        t.append(time.perf_counter_ns())
        st = seg.timings_ns
        timings = {"preprocess": st["normalise"], "find": st["network"] + st["extract"],
                   "classify": t[1] - t[0], "policy": t[2] - t[1]}
        return self._result(cols, targets, bonds, timings, seg)


def _median_neighbour_px(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance of points (n >= 2, shape (n, 2)), pixels."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))
