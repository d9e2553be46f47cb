"""The frame path: the stages a frame goes through, in order. Start reading here.

A frame arrives from a detector stream (:mod:`beamloop.streams`: receive, decode) and the service
(:class:`beamloop.edge.service.EdgeService`) hands it to a :class:`FramePath`, which runs one of the two
stage lists below. Each stage follows the contract of :mod:`beamloop.edge.frame.stage` (a name that is its
latency key, the slots it reads and writes, ``prepare`` / ``process`` / ``reset``). After the path, the
service drives the beam: bridge (:mod:`beamloop.edge.control.client`) and trigger (:mod:`beamloop.edge.trigger`).

=================  ==========================================================  ================================
path               stages (latency key: class)                                 slots written
=================  ==========================================================  ================================
``classical``      background: :class:`~beamloop.edge.stages.background.Background`    extras (frame)
                   preprocess: :class:`~beamloop.edge.stages.preprocess.Preprocess`   smooth, noise
                   find: :class:`~beamloop.edge.stages.find.FindPeaks`                columns, extras
                   classify: :class:`~beamloop.edge.stages.classify.Classify`         columns (classes)
                   vacancies: :class:`~beamloop.edge.stages.vacancies.InferVacancySites` (MoS2)  columns, bonds
                   ood: :class:`~beamloop.edge.stages.ood.OODAlarm`                   extras (ood, uncertainty)
                   register: :class:`~beamloop.edge.stages.register.Register` (drift correction)  extras (drift)
                   policy: :class:`~beamloop.edge.stages.policy.VacancyLinePolicy` (with a policy)  targets
``unet``           preprocess: :class:`~beamloop.edge.stages.unet.UNetNormalise`       extras
                   find: :class:`~beamloop.edge.stages.unet.UNetFind`                  columns, extras
                   vacancies, ood, register, policy: as above
=================  ==========================================================  ================================

The ``register`` stage is in a path only when drift correction is asked for (``register=``, the service's
lock-on ``predict``): without it both lists, and their latency keys, are what they were.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from beamloop.edge.frame.context import INPUT_SLOTS, SLOTS, FrameContext, FrameMeta
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.frame.stage import FrameError, FrameStage, check_frame
from beamloop.edge.materials import MOS2, Material
from beamloop.edge.materials import material as material_named
from beamloop.edge.stages.classify import Classify
from beamloop.edge.stages.find import FinderConfig, FindPeaks
from beamloop.edge.stages.policy import VacancyLinePolicy
from beamloop.edge.stages.preprocess import Preprocess
from beamloop.edge.stages.vacancies import InferVacancySites

BYTES_PER_PIXEL = 64
"""Upper estimate of the frame path's working memory per frame pixel, bytes: the stages' float32 buffers
(background, smoothed frame and its temporaries, score maps) and the float64 / complex temporaries of the
scale estimate of a series without a pixel size."""

DEFAULT_MEMORY_BUDGET = 1 << 30
"""Working memory the frame path may need for one series, bytes (1 GiB); see :meth:`FramePath.buffer_bytes`."""

MAX_FRAME_SIDE = 1 << 16
"""Largest frame side the frame path takes, pixels."""


class PathError(ValueError):
    """A stage list that breaks the contract: a slot read before any stage writes it, an unknown slot,
    or two stages with the same name."""


class FramePath:
    """Runs an ordered list of frame stages on one frame after another (the executor of the contract).

    Parameters
    ----------
    stages : sequence of FrameStage
        In the order a frame meets them.
    material : str or Material
        The material of every frame on this path (classes, physical scale).
    latency : LatencyRecorder, optional
        Receives each stage's duration under its name; none: durations only in ``ctx.timings_ns``.
    period_px : float, optional
        Lattice period in pixels for frames without a pixel size (the user's ``--spacing-px``); without it
        the period is estimated from the first frame of each such series.
    memory_budget_bytes : int
        Most working memory one series may need (:meth:`buffer_bytes`); a series that needs more is
        refused with a :class:`~beamloop.edge.frame.stage.FrameError` before any stage allocates.

    Raises
    ------
    PathError
        A stage reads a slot no earlier stage (or the runner) writes, names an unknown slot, or two stages
        share a name.

    Notes
    -----
    Per frame the runner checks the frame once (:func:`~beamloop.edge.frame.stage.check_frame`), calls every
    stage's ``prepare`` when the series' metadata changed, and times each ``process`` with two
    ``time.monotonic_ns`` calls (the receivers' clock, so a frame's stage starts in ``ctx.started_ns`` line up
    with its ``recv_ns``); with :attr:`measure_cpu` also the thread's CPU time per stage (``ctx.cpu_ns``): a
    stage whose wall time far exceeds its CPU time waited for a core. The context (:attr:`ctx`) is reused:
    its ``smooth`` buffer and the U-Net's heat maps are overwritten by the next frame, while ``columns`` and
    ``targets`` are new objects per frame that callers may keep.
    """

    def __init__(self, stages: Sequence[FrameStage], material: str | Material = MOS2,
                 latency: LatencyRecorder | None = None, period_px: float | None = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.stages = list(stages)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.material = material_named(material)
        self.latency = latency
        self.period_px = period_px
        self.ctx = FrameContext()
        self._check_contract()
        self._requested: FrameMeta | None = None
        self._names = tuple(s.name for s in self.stages)
        self.measure_cpu = False
        """Also measure each stage's thread CPU time (two ``time.thread_time_ns`` calls per stage)."""

    def _check_contract(self) -> None:
        written = set(INPUT_SLOTS)
        names = set()
        for s in self.stages:
            if not isinstance(s, FrameStage):
                raise PathError(f"{s!r} does not implement the FrameStage protocol (name, reads, writes, prepare, "
                                "process, reset)")
            if s.name in names:
                raise PathError(f"two stages are called {s.name!r}: stage names are latency keys and must be unique")
            names.add(s.name)
            for slot in (*s.reads, *s.writes):
                if slot not in SLOTS:
                    raise PathError(f"stage {s.name!r} names an unknown slot {slot!r}; slots: {SLOTS}")
            missing = [r for r in s.reads if r not in written]
            if missing:
                raise PathError(f"stage {s.name!r} reads {missing}, which no earlier stage writes")
            written.update(s.writes)

    @property
    def names(self) -> tuple[str, ...]:
        """Stage names (latency keys), in order."""
        return self._names

    @property
    def meta(self) -> FrameMeta | None:
        """Metadata of the current series as resolved for the stages (with the estimated scale)."""
        return self.ctx.meta

    def reset(self) -> None:
        """A new series starts: every stage forgets what it learned (e.g. the policy's row)."""
        for s in self.stages:
            s.reset()

    def _resolve(self, meta: FrameMeta, image: np.ndarray) -> FrameMeta:
        """``meta`` with a lattice scale for frames that have no physical one: the period given to the path
        (or in ``meta``), else estimated from ``image``, and the column sigma estimated from ``image``
        (:func:`beamloop.edge.analysis.spacing.estimate_scale`). When the image shows no lattice period (a
        small or featureless frame) but the pixel size is known, the material's column sigma in pixels sets
        the scale, with the period 5.5 sigma that :meth:`FinderConfig.for_spacing` assumes.

        Raises
        ------
        FrameError
            Neither a pixel size nor a period is known and none can be estimated from ``image``.
        """
        if (meta.pixel_size_A and meta.material.nn_spacing_A) or not self._needs_scale():
            return meta
        if meta.period_px is not None and meta.column_sigma_px is not None:
            return meta
        from beamloop.edge.analysis.spacing import estimate_scale

        period = meta.period_px if meta.period_px is not None else self.period_px
        try:
            est = estimate_scale(np.asarray(image, np.float32))
        except ValueError as exc:
            if period is not None:
                return replace(meta, period_px=float(period))
            if meta.pixel_size_A:
                sigma = meta.material.column_sigma_A / meta.pixel_size_A
                return replace(meta, period_px=5.5 * sigma, column_sigma_px=sigma)
            raise FrameError(f"frame has no pixel size and its lattice scale cannot be estimated: {exc}") from None
        return replace(meta, period_px=float(period if period is not None else est.period_px),
                       column_sigma_px=est.column_sigma_px)

    def _needs_scale(self) -> bool:
        return any(isinstance(s, (Preprocess, FindPeaks)) and s.config is None for s in self.stages)

    def buffer_bytes(self, meta: FrameMeta) -> int:
        """Estimated working memory of the stages for a series of ``meta``, bytes.

        :data:`BYTES_PER_PIXEL` per frame pixel, plus the smoothing kernel the scale implies (a
        Gaussian truncated at 4 sigma, with float64 temporaries): the sigma is the stages' fixed one, the
        series' ``column_sigma_px``, the material's column sigma over the pixel size, or a fifth of the
        lattice period, whichever is known first. A stage with a ``buffer_bytes(meta)`` method adds its
        own figure instead of the per-pixel estimate.
        """
        pixels = int(np.prod(meta.shape, dtype=np.float64))
        sizers = [getattr(s, "buffer_bytes", None) for s in self.stages]
        own = [size(meta) for size in sizers if callable(size)]
        total = sum(int(b) for b in own) if own else pixels * BYTES_PER_PIXEL
        sigma = None
        for s in self.stages:
            cfg = getattr(s, "config", None)
            if cfg is not None and isinstance(getattr(cfg, "sigma_px", None), (int, float)):
                sigma = float(cfg.sigma_px)
                break
        if sigma is None:
            if meta.column_sigma_px:
                sigma = meta.column_sigma_px
            elif meta.pixel_size_A and meta.material.column_sigma_A:
                sigma = meta.material.column_sigma_A / meta.pixel_size_A
            elif meta.period_px or self.period_px:
                sigma = float(meta.period_px or self.period_px or 0) / 5
        if sigma is not None and math.isfinite(sigma):
            total += int(8 * sigma + 1) * 8 * 4
        elif sigma is not None:
            total = 1 << 62
        return total

    def check_budget(self, meta: FrameMeta) -> None:
        """Refuse a series the path cannot take within its limits, before anything is allocated.

        Raises
        ------
        FrameError
            Frames with a side of more than :data:`MAX_FRAME_SIDE` pixels, or a series whose
            :meth:`buffer_bytes` exceed :attr:`memory_budget_bytes`.
        """
        if len(meta.shape) != 2 or not all(0 < int(v) <= MAX_FRAME_SIDE for v in meta.shape):
            raise FrameError(f"frame shape {meta.shape} is outside 1 .. {MAX_FRAME_SIDE} pixels per side")
        need = self.buffer_bytes(meta)
        if need > self.memory_budget_bytes:
            scale = f", pixel size {meta.pixel_size_A:g} A" if meta.pixel_size_A else ""
            raise FrameError(f"a series of {meta.shape[0]}x{meta.shape[1]} {meta.dtype} frames{scale} needs about "
                             f"{need / 2**20:.1f} MiB of frame-path buffers, over the budget of "
                             f"{self.memory_budget_bytes / 2**20:.1f} MiB (raise it with the memory budget "
                             "option)")

    def prepare(self, meta: FrameMeta, image: np.ndarray | None = None) -> FrameMeta:
        """Prepare every stage for ``meta`` (resolving the scale from ``image`` when needed); returns the
        resolved metadata.

        Raises
        ------
        FrameError
            A series over the memory budget (:meth:`check_budget`, before any stage allocates), a stage
            that cannot take such frames, or a scale that cannot be estimated.
        """
        self.check_budget(meta)
        resolved = self._resolve(meta, image) if image is not None else meta
        if resolved is not meta:
            self.check_budget(resolved)
        for s in self.stages:
            s.prepare(resolved)
        self._requested = meta
        self.ctx.meta = resolved
        return resolved

    def run(self, image: np.ndarray, pixel_size_A: float | None = None, scan: ScanFrame | None = None, *,
            meta: FrameMeta | None = None, record: bool = True, want_targets: bool = True) -> FrameContext:
        """Run every stage on one frame; returns the path's (reused) context.

        Parameters
        ----------
        image : ndarray (rows, cols), integer or float32/float64
            The frame (counts or intensities).
        pixel_size_A : float, optional
            Angstrom per pixel (from the stream's ``start`` message or the file); ignored with ``meta``.
        scan : ScanFrame, optional
            The scan frame the image belongs to; the policy needs it for targets.
        meta : FrameMeta, optional
            The series' metadata (callers that know it per series build it once); by default made from
            the image, the pixel size and the path's material.
        record : bool
            Whether stage durations go to the latency recorder (False for warm-up frames).
        want_targets : bool
            False: the policy chooses no targets for this frame (e.g. a verification frame).

        Raises
        ------
        FrameError
            The frame is rejected (bad shape, dtype or pixels; a stage cannot take it; no estimable scale).
        """
        check_frame(image)
        if meta is None:
            meta = FrameMeta.of(image, pixel_size_A, self.material)
        if meta != self._requested:
            self.prepare(meta, image)
        ctx = self.ctx
        ctx.clear()
        ctx.image, ctx.scan, ctx.want_targets = image, scan, want_targets
        timings, started = ctx.timings_ns, ctx.started_ns
        lat = self.latency if record else None
        if self.measure_cpu:
            cpu = ctx.cpu_ns
            for s in self.stages:
                c0 = time.thread_time_ns()
                t0 = time.monotonic_ns()
                s.process(ctx)
                dt = time.monotonic_ns() - t0
                cpu[s.name] = time.thread_time_ns() - c0
                timings[s.name] = dt
                started[s.name] = t0
                if lat is not None:
                    lat.add(s.name, dt)
            return ctx
        for s in self.stages:
            t0 = time.monotonic_ns()
            s.process(ctx)
            dt = time.monotonic_ns() - t0
            timings[s.name] = dt
            started[s.name] = t0
            if lat is not None:
                lat.add(s.name, dt)
        return ctx


# --------------------------------------------------------------------------------------------------------
# the two stage lists
# --------------------------------------------------------------------------------------------------------
def classical_stages(material: str | Material = MOS2, policy: VacancyLinePolicy | None = None,
                     config: FinderConfig | None = None, background: str = "auto", ood: bool = True,
                     register: FrameStage | None = None) -> list[FrameStage]:
    """background -> preprocess -> find -> classify -> (MoS2) vacancies -> ood -> (drift correction) register
    -> (with a policy) policy.

    ``background``: ``"auto"`` (the stage works on series without a pixel size), ``"on"``, or ``"off"`` (no
    background stage); ``ood``: the out-of-distribution stage (:mod:`beamloop.edge.stages.ood`); ``register``:
    the frame-registration stage (:class:`beamloop.edge.stages.register.Register`), none by default."""
    from beamloop.edge.stages.background import Background
    from beamloop.edge.stages.ood import OODAlarm

    m = material_named(material)
    bg = background != "off"
    stages: list[FrameStage] = ([Background(background, config)] if bg else []) + [
        Preprocess(config, from_background=bg), FindPeaks(config, from_background=bg), Classify()]
    if m.name == MOS2.name:
        stages.append(InferVacancySites("smooth"))
    if ood:
        stages.append(OODAlarm("classical"))
    _add_register(stages, register, m)
    if policy is not None:
        stages.append(policy)
    return stages


def _add_register(stages: list[FrameStage], register: FrameStage | None, material: Material) -> None:
    """Append the registration stage (unwrapping by the lattice only where a vacancies stage gives bonds)."""
    if register is None:
        return
    from beamloop.edge.stages.register import Register

    if isinstance(register, Register):
        register.use_bonds(material.name == MOS2.name)
    stages.append(register)


def unet_stages(material: str | Material = MOS2, policy: VacancyLinePolicy | None = None, unet=None,
                ood: bool = True, register: FrameStage | None = None) -> list[FrameStage]:
    """preprocess (normalise) -> find (network, extraction) -> (MoS2) vacancies -> ood -> (drift correction)
    register -> (with a policy) policy.

    ``unet`` is a :class:`~beamloop.edge.stages.unet.UNetFinder`; by default the shipped FP32 model on the
    best device.
    """
    from beamloop.edge.stages.ood import OODAlarm
    from beamloop.edge.stages.unet import UNetFind, UNetFinder, UNetNormalise

    m = material_named(material)
    finder = unet if unet is not None else UNetFinder()
    stages: list[FrameStage] = [UNetNormalise(finder), UNetFind(finder)]
    if m.name == MOS2.name:
        stages.append(InferVacancySites("image"))
    if ood:
        stages.append(OODAlarm("unet", finder.model_dir))
    _add_register(stages, register, m)
    if policy is not None:
        stages.append(policy)
    return stages


PATHS: dict[str, Callable[..., list[FrameStage]]] = {}
"""Stage-list builders by finder name (``beamloop find --method``, ``serve --method``)."""


def register_path(name: str, build: Callable[..., list[FrameStage]]) -> None:
    """Make ``build(material, policy, **options) -> list of stages`` available as path ``name``."""
    PATHS[name] = build


register_path("classical", lambda material, policy=None, config=None, background="auto", ood=True, register=None, **_:
              classical_stages(material, policy, config, background, ood, register))
register_path("unet", lambda material, policy=None, unet=None, ood=True, register=None, **_:
              unet_stages(material, policy, unet, ood, register))

METHODS = tuple(PATHS)
"""Column finders the frame path offers (``--method``)."""


def frame_path(method: str = "classical", material: str | Material = MOS2, policy: VacancyLinePolicy | None = None,
               latency: LatencyRecorder | None = None, *, config: FinderConfig | None = None,
               period_px: float | None = None, unet=None, background: str = "auto", ood: bool = True,
               register: FrameStage | None = None) -> FramePath:
    """A :class:`FramePath` of the named stage list.

    Parameters
    ----------
    method : {"classical", "unet"}
    material : str or Material
    policy : VacancyLinePolicy, optional
        Chooses beam targets (the last stage); none -> no targets.
    latency : LatencyRecorder, optional
    config : FinderConfig, optional
        Fixed classical-finder parameters (default: from each series' pixel size or estimated scale).
    period_px : float, optional
        Lattice period for frames without a pixel size (see :class:`FramePath`).
    unet : UNetFinder, optional
        The learned finder (``method="unet"``).
    background : {"auto", "on", "off"}
        The classical path's background stage (:mod:`beamloop.edge.stages.background`): ``auto`` works on
        series without a pixel size.
    ood : bool
        Include the out-of-distribution stage (:mod:`beamloop.edge.stages.ood`).
    register : FrameStage, optional
        Frame registration for drift correction (:class:`beamloop.edge.stages.register.Register`), before the
        policy; none by default.

    Raises
    ------
    ValueError
        Unknown method or material.
    """
    if method not in PATHS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    extra = {} if register is None else {"register": register}
    return FramePath(PATHS[method](material_named(material), policy, config=config, unet=unet, background=background,
                                   ood=ood, **extra), material, latency, period_px=period_px)
