"""The learned column finder: a U-Net ensemble served with ONNX Runtime, columns extracted in numba.

Serving only: numpy, numba and onnxruntime, never torch (training and export live in :mod:`beamloop.edge.learn`).

- Model files: ``edge/models/unet/`` holds one ONNX file per precision (FP32, FP16, INT8) of the whole ensemble
  (all members in one graph) and ``manifest.json`` (files, tile size, members, classes, training data, metrics).
- Sessions (:class:`EnsembleSession`): provider selection ``auto`` = TensorRT, then CUDA, then CPU
  (:func:`select_providers`); a fixed input shape (1, 1, 256, 256); IO binding to preallocated input and output
  buffers; warm-up runs at start-up.
- Frames (:class:`UNetFinder`): normalised once (:func:`normalise_frame`), cut into overlapping tiles
  (:func:`tile_origins`), stitched from the tiles' cores, then columns are extracted from the ensemble-mean heat
  map with the classical finder's numba kernels; the ensemble spread gives per-pixel and per-column uncertainty
  (ensembles of independently initialised networks as in ELIT: Ghosh et al., npj Comput. Mater. 7, 100 (2021);
  B. Lakshminarayanan et al., "Simple and scalable predictive uncertainty estimation using deep ensembles",
  NeurIPS 2017).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.stage import FrameError, StageBase, check_frame
from beamloop.edge.kernels.heatmap import affine_into, box_mean, mean_std, median_nn_distance, member_stats
from beamloop.edge.kernels.peaks import REFINE_METHODS, PeakBuffers, local_maxima, refine, suppress
from beamloop.edge.materials import GENERIC, MOS2

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta

SEG_CLASSES = ("Mo", "S2", "S1", "column")
"""Class channels of the network: the MoS2 classes, and a generic column for every other material."""

HEAT_SIGMA_PX = 1.5
"""Standard deviation of the Gaussian the network draws at each column centre, pixels."""

_PEAK_FLOOR = 0.3
"""Heat-map peaks at or above this level count for a frame's typical column heat (relative threshold)."""


def normalise_frame(frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The network's input: the frame minus its mean, divided by its standard deviation (float32).

    Parameters
    ----------
    frame : ndarray (rows, cols), integer or float
    out : ndarray (rows, cols) float32, optional
        Written in place when given.

    Returns
    -------
    ndarray (rows, cols) float32; all zero for a flat frame.
    """
    if out is None:
        out = np.empty(frame.shape, np.float32)
    mean, std = mean_std(frame)
    affine_into(frame, mean, 1.0 / std if std > 0 else 0.0, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# model files and ONNX Runtime sessions
# ---------------------------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16", "int8")
"""Shipped precisions of the ensemble."""

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
"""``--device`` choices."""

_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class ModelError(RuntimeError):
    """The model files are missing or inconsistent, or the requested device is not available."""


def default_model_dir() -> Path:
    """Folder of the shipped models: ``edge/models/unet`` inside the installed package."""
    return Path(str(resources.files("beamloop.edge"))) / "models" / "unet"


def load_manifest(model_dir: str | Path | None = None) -> dict:
    """The manifest (``manifest.json``) of a model folder.

    Raises
    ------
    ModelError
        No manifest, or one that does not name the files, tile size and outputs.
    """
    d = Path(model_dir) if model_dir else default_model_dir()
    path = d / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{path}: no model manifest; train and export with `beamloop train`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    for key in ("files", "tile", "members", "classes"):
        if key not in m:
            raise ModelError(f"{path}: manifest lacks {key!r}")
    if tuple(m["classes"]) != SEG_CLASSES:
        raise ModelError(f"{path}: model classes {m['classes']} differ from {SEG_CLASSES}")
    return m


def select_providers(device: str = "auto", available: list[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers for ``device``, best first, CPU always last.

    ``auto`` takes TensorRT, then CUDA, then the CPU, as far as this onnxruntime build offers them
    (``onnxruntime-gpu``, the ``gpu`` extra, brings CUDA and TensorRT). ``cuda`` and ``tensorrt`` insist.

    Raises
    ------
    ModelError
        ``cuda`` or ``tensorrt`` asked for but not in this onnxruntime build, or an unknown device.
    """
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {DEVICES}")
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    cpu = _PROVIDERS["cpu"]
    if device == "cpu":
        return [cpu]
    if device in ("cuda", "tensorrt"):
        want = [_PROVIDERS[device]] + ([_PROVIDERS["cuda"]] if device == "tensorrt" else [])
        if _PROVIDERS[device] not in available:
            raise ModelError(f"{_PROVIDERS[device]} is not available in this onnxruntime build "
                             f"(available: {available}); install the 'gpu' extra (onnxruntime-gpu) on a machine with "
                             "an NVIDIA GPU, or use --device cpu")
        return [p for p in want if p in available] + [cpu]
    return [p for p in (_PROVIDERS["tensorrt"], _PROVIDERS["cuda"]) if p in available] + [cpu]


def _provider_options(provider: str) -> dict:
    """Options per provider: TensorRT keeps its built engines in ``~/.cache/beamloop/tensorrt`` (building one
    takes minutes; later start-ups load it)."""
    if provider == _PROVIDERS["tensorrt"]:
        cache = Path.home() / ".cache" / "beamloop" / "tensorrt"
        cache.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return {}


class EnsembleSession:
    """One ONNX Runtime session of the exported ensemble, with a fixed tile shape, IO binding and warm-up.

    Parameters
    ----------
    path : path to the ``.onnx`` file
        Input ``image`` (1, 1, T, T) float32 (or float16 for the FP16 file); outputs ``heat`` (1, M, T, T) and
        ``classes`` (1, 4, T, T).
    device : str
        See :func:`select_providers`.
    threads : int, optional
        Intra-op threads (default: ONNX Runtime's choice, all cores).
    warmup : int
        Runs on a blank tile at start-up (kernel selection, memory arenas, TensorRT engine build).

    Attributes
    ----------
    heat : ndarray (M, T, T) float32
        Output buffer of the last run (reused).
    classes : ndarray (4, T, T) float32
    input : ndarray (1, 1, T, T)
        Input buffer: write the tile here, then call :meth:`run`.
    providers : list of str
        Providers the session really uses.

    Raises
    ------
    ModelError
        Missing file, a model whose input is not a fixed (1, 1, T, T) tile, or an unavailable device.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None, warmup: int = 2) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        providers = [(p, _provider_options(p)) for p in select_providers(device)]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from None
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or not all(isinstance(s, int) for s in inp.shape) or inp.shape[:2] != [1, 1]:
            raise ModelError(f"{path}: input {inp.name} has shape {inp.shape}; expected a fixed (1, 1, T, T) tile")
        self.tile = int(inp.shape[2])
        in_dtype = np.float16 if "float16" in inp.type else np.float32
        outs = {o.name: o for o in self.session.get_outputs()}
        if set(outs) != {"heat", "classes"}:
            raise ModelError(f"{path}: outputs {sorted(outs)}; expected 'heat' and 'classes'")
        out_dtype = np.float16 if "float16" in outs["heat"].type else np.float32
        self.members = int(outs["heat"].shape[1])
        t = self.tile
        self.input = np.zeros((1, 1, t, t), in_dtype)
        self._heat = np.zeros((1, self.members, t, t), out_dtype)
        self._classes = np.zeros((1, len(SEG_CLASSES), t, t), out_dtype)
        self.heat = self._heat[0] if out_dtype == np.float32 else np.zeros((self.members, t, t), np.float32)
        self.classes = self._classes[0] if out_dtype == np.float32 else np.zeros((len(SEG_CLASSES), t, t), np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(inp.name, self.input)
        for name, buf in (("heat", self._heat), ("classes", self._classes)):
            self._binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buf))
        for _ in range(warmup):
            self.run()

    def run(self) -> None:
        """Run the network on :attr:`input`; results land in :attr:`heat` and :attr:`classes`."""
        self._binding.synchronize_inputs()
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        if self._heat.dtype != np.float32:
            self.heat[...] = self._heat[0]
            self.classes[...] = self._classes[0]


def tile_origins(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``n`` pixels with at least ``overlap`` shared.

    The last tile ends at ``n``. ``n <= tile`` gives ``[0]`` (the frame is padded).

    Raises ``ValueError`` when the overlap is negative or not smaller than the tile.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must lie in [0, tile), got {overlap} for tile {tile}")
    if n <= tile:
        return [0]
    stride = tile - overlap
    k = int(math.ceil((n - tile) / stride))
    return sorted({min(i * stride, n - tile) for i in range(k + 1)})


def _core(origins: list[int], k: int, n: int, tile: int) -> tuple[int, int]:
    """The part of tile ``k`` (frame coordinates) whose pixels it owns: halfway into each overlap."""
    o = origins[k]
    lo = 0 if k == 0 else (origins[k - 1] + tile + o) // 2
    hi = min(n, o + tile) if k == len(origins) - 1 else (o + tile + origins[k + 1]) // 2
    return lo, hi


@dataclass
class SegmentResult:
    """What the learned finder made of one frame.

    Attributes
    ----------
    columns : ColumnTable
        Found columns: ``x, y`` sub-pixel (pixels), ``intensity`` the 3x3 mean of the raw frame at the column
        (frame units), ``score`` the ensemble-mean heat at the peak (0..1), ``cls`` by the class channels:
        ``("Mo", "S2", "S1")`` for MoS2, ``("column",)`` otherwise.
    uncertainty : ndarray (n,) float32
        Per-column uncertainty (:meth:`UNetFinder.find`); higher = less trustworthy.
    heat_std : ndarray (n,) float32
        Ensemble standard deviation of the heat at each column's peak pixel.
    position_std_px : ndarray (n,) float32
        RMS distance of the members' own sub-pixel positions from the ensemble's, pixels.
    heat : ndarray (rows, cols) float32
        Ensemble-mean heat map (a buffer reused by the next frame).
    heat_map_std : ndarray (rows, cols) float32
        Per-pixel uncertainty: ensemble standard deviation of the heat (reused buffer).
    class_prob : ndarray (4, n) float32
        Ensemble-mean class probabilities (:data:`SEG_CLASSES`) at each column.
    timings_ns : dict
        ``normalise``, ``network``, ``extract`` durations (set by :meth:`UNetFinder.find`).
    threshold : float
        Heat threshold applied to this frame (the fixed floor or the frame's relative threshold).
    min_distance_px : float
        Minimum column distance applied to this frame, pixels.
    """

    columns: ColumnTable
    uncertainty: np.ndarray
    heat_std: np.ndarray
    position_std_px: np.ndarray
    heat: np.ndarray
    heat_map_std: np.ndarray
    class_prob: np.ndarray
    timings_ns: dict = field(default_factory=dict)
    threshold: float = math.nan
    min_distance_px: float = math.nan


class UNetFinder:
    """Finds atomic columns with the shipped U-Net ensemble (ONNX Runtime) and reports their uncertainty.

    Method: the frame is normalised (:func:`normalise_frame`), cut into tiles of the model's fixed size with
    ``overlap`` pixels shared (each output pixel is taken from the tile whose core holds it), and each tile
    runs through all members at once. Columns are the local maxima of the ensemble-mean heat map above the
    frame's threshold, kept at least the frame's minimum distance apart (greedy, brightest first), and refined
    to sub-pixel by a parabola through the logarithm of the 3x3 neighbourhood (exact for the Gaussian the
    network was trained to draw); the same refinement on each member's map gives the members' positions.
    Kernels are those of the classical finder (:mod:`beamloop.edge.stages.find`).

    Threshold and minimum distance adapt to the frame (no pixel size needed). Threshold:
    ``max(threshold, relative_threshold * p90)``, with ``p90`` the 90th percentile of the heat of all peaks
    above 0.3 -- at low dose the network's confidence in real columns drops, and a fixed threshold either
    loses them or, at 1e4 e-/A^2 and above, lets noise blobs at empty lattice sites (MoS2 hexagon centres)
    through. Minimum distance: ``max(min_distance_px, spacing_fraction * d_nn)``, with ``d_nn`` the median
    nearest-neighbour distance of the columns kept at ``min_distance_px`` -- a noisy column the network
    splits into two peaks keeps only the stronger, while dumbbells (every column's nearest neighbour is its
    partner) survive. Limits: two real columns closer than ``spacing_fraction * d_nn`` (at a grain boundary, a
    dislocation core) are reported as one; and where most columns are split (the network's failure mode on
    some real images) ``d_nn`` is the split distance and the rule does not help. The constants were tuned on held-out
    simulated MoS2 at 1e4 e-/A^2 (seeds 300000+ and
    500000+, 20 frames: recall 0.993, precision 0.991, where the old fixed 0.4 / 2.5 px gave 0.999 / 0.955),
    not on the test seeds; see bench/unet_diagnose.py and bench/results/unet_diagnose.json.

    Per-column uncertainty: ``heat_std / score + position_std_px / HEAT_SIGMA_PX`` -- members that disagree
    on whether a column is there, or on where it is. Per-pixel uncertainty: the ensemble standard deviation
    of the heat.

    Parameters
    ----------
    model_dir : path, optional
        Folder with ``manifest.json`` and the ``.onnx`` files (default: the shipped model).
    precision : {"fp32", "fp16", "int8"}
    device : {"auto", "cpu", "cuda", "tensorrt"}
    threads : int, optional
        ONNX Runtime intra-op threads.
    threshold : float
        Minimum ensemble-mean heat of a column (0..1); the floor of the frame's threshold.
    min_distance_px : float
        Minimum distance between columns, pixels; the floor of the frame's minimum distance.
    relative_threshold : float
        Fraction of the frame's 90th-percentile peak heat a column must reach (0 disables).
    spacing_fraction : float
        Fraction of the frame's median nearest-neighbour column distance below which two peaks are one
        column (0 disables).
    overlap : int
        Pixels shared by neighbouring tiles (> twice the network's effective reach is not needed: ~32).

    Raises
    ------
    ModelError
        Missing or inconsistent model files, unknown precision, unavailable device.
    """

    def __init__(self, model_dir: str | Path | None = None, precision: str = "fp32", device: str = "auto",
                 threads: int | None = None, threshold: float = 0.4, min_distance_px: float = 2.5,
                 overlap: int = 32, warmup: int = 2, relative_threshold: float = 0.6,
                 spacing_fraction: float = 0.6) -> None:
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.manifest = load_manifest(self.model_dir)
        if precision not in self.manifest["files"]:
            raise ModelError(f"{self.model_dir}: no {precision} model in the manifest")
        self.precision = precision
        self.session = EnsembleSession(self.model_dir / self.manifest["files"][precision], device, threads, warmup)
        self.threshold = float(threshold)
        self.min_distance_px = float(min_distance_px)
        self.relative_threshold = float(relative_threshold)
        self.spacing_fraction = float(spacing_fraction)
        self.overlap = int(overlap)
        self._shape: tuple[int, int] | None = None

    @property
    def providers(self) -> list[str]:
        """Execution providers in use."""
        return self.session.providers

    def allocate(self, shape: tuple[int, int]) -> None:
        """Buffers for frames of ``shape`` (reused by every later frame of that shape).

        Raises
        ------
        FrameError
            Frames smaller than 8 x 8 pixels.
        """
        if min(shape) < 8:
            raise FrameError(f"frame {tuple(shape)} is too small for the network (need >= 8 x 8 pixels)")
        rows, cols = shape
        m = self.session.members
        self.norm = np.empty(shape, np.float32)
        self._heat = np.zeros((m, rows, cols), np.float32)
        self._cls = np.zeros((len(SEG_CLASSES), rows, cols), np.float32)
        self._mean = np.empty(shape, np.float32)
        self._std = np.empty(shape, np.float32)
        self._peaks = PeakBuffers(shape, members=m + 1)
        self._inten = np.empty(self._peaks.capacity, np.float64)
        self._nn = np.empty(256, np.float64)
        t = self.session.tile
        self._rows = tile_origins(rows, t, self.overlap)
        self._cols = tile_origins(cols, t, self.overlap)
        self._shape = (int(shape[0]), int(shape[1]))

    def _network(self, norm: np.ndarray) -> None:
        """Run all tiles and stitch the member heat maps and class maps into the frame buffers."""
        s = self.session
        t = s.tile
        rows, cols = norm.shape
        for a, r0 in enumerate(self._rows):
            i0, i1 = _core(self._rows, a, rows, t)
            for b, c0 in enumerate(self._cols):
                j0, j1 = _core(self._cols, b, cols, t)
                h, w = min(t, rows - r0), min(t, cols - c0)
                if h < t or w < t:
                    s.input[...] = 0  # frames smaller than the tile: the padding reads as mean level
                s.input[0, 0, :h, :w] = norm[r0:r0 + h, c0:c0 + w]
                s.run()
                self._heat[:, i0:i1, j0:j1] = s.heat[:, i0 - r0:i1 - r0, j0 - c0:j1 - c0]
                self._cls[:, i0:i1, j0:j1] = s.classes[:, i0 - r0:i1 - r0, j0 - c0:j1 - c0]

    def find(self, frame: np.ndarray, material: str = "generic") -> SegmentResult:
        """Find the columns of one frame (outside a frame path: checks the frame, then normalise, network,
        extract).

        Parameters
        ----------
        frame : ndarray (rows, cols), integer or float32/float64
            HAADF counts or intensities, any offset and gain; pixel sizes 0.05-0.3 Angstrom were trained.
        material : {"MoS2", "generic"}
            ``MoS2`` labels columns Mo / S2 / S1 from the class channels; ``generic`` labels all ``column``.

        Returns
        -------
        SegmentResult
            Its arrays ``heat`` and ``heat_map_std`` are buffers reused by the next call.

        Raises
        ------
        beamloop.edge.frame.stage.FrameError
            Not 2-D, smaller than 8 x 8, unsupported dtype, or non-finite pixels.
        ValueError
            Unknown material.
        """
        if material not in (MOS2.name, GENERIC.name):
            raise ValueError(f"material must be 'MoS2' or 'generic', got {material!r}")
        check_frame(frame)
        t0 = time.perf_counter_ns()
        self.normalise(frame)
        t1 = time.perf_counter_ns()
        self.infer()
        t2 = time.perf_counter_ns()
        res = self.extract(frame, material)
        res.timings_ns = {"normalise": t1 - t0, "network": t2 - t1, "extract": time.perf_counter_ns() - t2}
        return res

    def normalise(self, frame: np.ndarray) -> np.ndarray:
        """Write the network's input for ``frame`` into :attr:`norm` (float32, the frame's shape) and return it."""
        if self._shape != frame.shape:
            self.allocate(frame.shape)
        return normalise_frame(frame, self.norm)

    def infer(self) -> None:
        """Run the ensemble on :attr:`norm`, tile by tile, into the heat and class maps."""
        self._network(self.norm)

    def extract(self, frame: np.ndarray, material: str) -> SegmentResult:
        """Columns and uncertainty from the heat maps of the last :meth:`infer` (see the class docstring)."""
        mean, std, heat = self._mean, self._std, self._heat
        b = self._peaks
        member_stats(heat, mean, std)
        n = local_maxima(mean, 0, b.rmax, b.ci, b.cj, b.cv)
        n = min(n, b.capacity)
        cv = b.cv[:n]
        thr = self.threshold
        if self.relative_threshold > 0:
            peaks = cv[cv >= _PEAK_FLOOR]
            if len(peaks) >= 8:
                thr = max(thr, self.relative_threshold * float(np.percentile(peaks, 90)))
        good = np.flatnonzero(cv >= thr)
        order = good[np.argsort(-cv[good], kind="stable")]
        md = self.min_distance_px
        nk = suppress(b.ci, b.cj, order, len(order), md, b.mask, b.keep)
        if self.spacing_fraction > 0 and nk >= 8:
            spacing = median_nn_distance(b.ci, b.cj, b.keep, nk, self._nn)
            if self.spacing_fraction * spacing > md:
                md = self.spacing_fraction * spacing
                nk = suppress(b.ci, b.cj, order, len(order), md, b.mask, b.keep)
        m = heat.shape[0]
        args = (b.ci, b.cj, b.bg, b.keep, nk, REFINE_METHODS["gauss"], 1.5)  # bg: zeros, heat has no background
        refine(mean, *args, b.x[m], b.y[m], b.h[m])
        for k in range(m):
            refine(heat[k], *args, b.x[k], b.y[k], b.h[k])
        box_mean(frame, b.ci, b.cj, b.keep, nk, self._inten)
        kept = b.keep[:nk]
        ii, jj = b.ci[kept], b.cj[kept]
        x, y = b.x[m, :nk], b.y[m, :nk]
        pos_std = np.sqrt(np.mean((b.x[:m, :nk] - x) ** 2 + (b.y[:m, :nk] - y) ** 2, axis=0))
        score = mean[ii, jj]
        hstd = std[ii, jj]
        prob = self._cls[:, ii, jj]
        if material == MOS2.name:
            cls = np.argmax(prob[:3], axis=0).astype(np.int8)
            names = MOS2.class_names
        else:
            cls = np.zeros(nk, np.int8)
            names = GENERIC.class_names
        cols = ColumnTable(x.astype(np.float32), y.astype(np.float32), self._inten[:nk].astype(np.float32),
                           score.astype(np.float32), cls, names)
        unc = hstd / np.maximum(score, 1e-6) + pos_std / HEAT_SIGMA_PX
        return SegmentResult(cols, unc.astype(np.float32), hstd.astype(np.float32), pos_std.astype(np.float32), mean,
                             std, prob.astype(np.float32), threshold=float(thr), min_distance_px=float(md))

class UNetNormalise(StageBase):
    """Frame stage ``preprocess`` of the U-Net path: the network's input (frame minus its mean, over its
    standard deviation) into the finder's buffer, referenced as ``extras["unet_input"]``.

    Parameters
    ----------
    finder : UNetFinder
        Shared with the :class:`UNetFind` stage that follows.
    """

    name = "preprocess"
    reads = ("image",)
    writes = ("extras",)

    def __init__(self, finder: UNetFinder) -> None:
        self.finder = finder

    def prepare(self, meta: FrameMeta) -> None:
        """Buffers for the series' shape.

        Raises
        ------
        FrameError
            Frames smaller than 8 x 8 pixels.
        """
        self.finder.allocate(meta.shape)

    def process(self, ctx: FrameContext) -> None:
        """Normalise ``ctx.image``."""
        ctx.extras["unet_input"] = self.finder.normalise(ctx.image)


class UNetFind(StageBase):
    """Frame stage ``find`` of the U-Net path: network and column extraction; writes ``columns`` (classified
    by the network: Mo / S2 / S1 for MoS2) and ``extras["segment"]`` (the :class:`SegmentResult`: heat maps,
    per-pixel and per-column uncertainty).

    Parameters
    ----------
    finder : UNetFinder
    """

    name = "find"
    reads = ("image", "extras")
    writes = ("columns", "extras")

    def __init__(self, finder: UNetFinder) -> None:
        self.finder = finder
        self._material = GENERIC.name

    def prepare(self, meta: FrameMeta) -> None:
        """Remember the material (MoS2 gets the network's classes; others one ``column`` class)."""
        self._material = MOS2.name if meta.material.name == MOS2.name else GENERIC.name

    def process(self, ctx: FrameContext) -> None:
        """Run the network on the normalised frame and extract its columns."""
        self.finder.infer()
        seg = self.finder.extract(ctx.image, self._material)
        ctx.extras["segment"] = seg
        ctx.columns = seg.columns

