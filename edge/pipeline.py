"""The stages a frame goes through, in order. Start reading here.

=============  =====================================================  ==========================
stage          what it does                                           where
=============  =====================================================  ==========================
receive        read the message from the detector stream into a       :class:`streams.receiver.FrameReceiver`
               preallocated ring buffer
decode         validate the header, decompress LZ4 blobs              :mod:`streams.native`
preprocess     float32 conversion, Gaussian smoothing, noise sigma    :class:`edge.preprocess.Preprocessor`
find           local maxima, minimum separation, sub-pixel centres    :class:`edge.find.ColumnFinder`
classify       Mo / S2 / S1 / vacancy site (MoS2), or "column"        :mod:`edge.classify`
policy         choose beam targets (e.g. S2 columns along a line)     :class:`edge.policy.VacancyLinePolicy`
bridge         park the probe, unblank, blank (request/reply)         :class:`edge.bridge.BridgeClient`
trigger        watch the parked-probe ADF stream; blank on ejection   :mod:`edge.trigger`
=============  =====================================================  ==========================

:class:`FramePipeline` runs preprocess -> find -> classify -> policy on one frame; the service
(:class:`edge.service.EdgeService`) runs receive and decode before it, and bridge and trigger after it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from edge.classify import GenericClassifier, MoS2Classifier
from edge.columns import ColumnTable
from edge.find import ColumnFinder, FinderConfig
from edge.latency import LatencyRecorder
from edge.policy import Target, VacancyLinePolicy
from edge.scanframe import ScanFrame

MOS2_SPACING_A = 1.824
"""Projected Mo-S distance of MoS2, Angstrom (a / sqrt(3), a = 3.16 Angstrom)."""


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
    """

    columns: ColumnTable
    targets: list[Target] = field(default_factory=list)
    bonds: np.ndarray | None = None
    timings_ns: dict = field(default_factory=dict)


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
        Fixed finder parameters; by default they follow the pixel size (MoS2 scale) or the given
        column spacing.
    """

    def __init__(self, material: str = "MoS2", policy: VacancyLinePolicy | None = None,
                 latency: LatencyRecorder | None = None, finder_config: FinderConfig | None = None) -> None:
        if material not in ("MoS2", "generic"):
            raise ValueError(f"material must be 'MoS2' or 'generic', got {material!r}")
        self.material = material
        self.policy = policy
        self.latency = latency
        self._fixed = finder_config
        self._finders: dict[float, ColumnFinder] = {}
        self._classifiers: dict[float, object] = {}

    def finder_for(self, pixel_size_A: float | None) -> ColumnFinder:
        """The finder for frames of this pixel size (cached; MoS2 scale unless a config was given).

        Raises ``ValueError`` when neither a pixel size nor a fixed configuration is available.
        """
        key = float(pixel_size_A) if pixel_size_A else 0.0
        f = self._finders.get(key)
        if f is None:
            if self._fixed is not None:
                cfg = self._fixed
            elif pixel_size_A and math.isfinite(pixel_size_A):
                cfg = FinderConfig.for_pixel_size(pixel_size_A, spacing_A=MOS2_SPACING_A)
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
        edge.preprocess.FrameError
            Bad frame (not 2-D, too small, non-finite pixels).
        """
        finder = self.finder_for(pixel_size_A)
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
        timings = dict(zip(("preprocess", "find", "classify", "policy"), np.diff(t).tolist()))
        if self.latency is not None:
            for stage, ns in timings.items():
                self.latency.add(stage, ns)
        return FrameResult(cols, targets, bonds, timings)
