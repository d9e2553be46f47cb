"""The GPU section: the frame-path stage table on an NVIDIA GPU, saved with the GPU's name.

Detection (:func:`detect`) asks ``nvidia-smi``, numba (``numba.cuda.is_available()``), ONNX Runtime
(``CUDAExecutionProvider``) and, only when it is installed, torch (``torch.cuda.is_available()``). With
no usable device the section is skipped with the reasons.

On a GPU the classical path is timed per stage with numba CUDA kernels for the preprocessing (the
same separable Gaussian with reflected borders as :func:`beamloop.edge.stages.preprocess._smooth`, and Immerkaer's noise
estimate as :func:`beamloop.edge.stages.preprocess.noise_sigma`, reduced in shared memory), the frame uploaded before
and the smoothed frame downloaded after, then the CPU finder (:meth:`beamloop.edge.stages.find.ColumnFinder.find_smoothed`)
and classifier on it:

    h2d -> preprocess (GPU) -> d2h -> find (CPU) -> classify (CPU)

and the learned path, when a U-Net model is installed, with ONNX Runtime's CUDA provider
(:class:`beamloop.edge.stages.unet.UNetFinder` ``device="cuda"``). The kernels run under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) too, which is how the tests check them against the CPU kernels here.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import time

import numpy as np
from numba import cuda, float32, float64

THREADS_2D = (16, 16)
THREADS_1D = 256


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"ok": False, "reason": "nvidia-smi not found (no NVIDIA driver)"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "reason": f"nvidia-smi failed: {exc}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"ok": False, "reason": f"nvidia-smi: {out.stderr.strip() or 'no GPU listed'}"}
    name, mem, driver = (v.strip() for v in (out.stdout.strip().splitlines()[0].split(",") + ["", ""])[:3])
    return {"ok": True, "name": name, "memory": mem, "driver": driver}


def _numba_cuda() -> dict:
    try:
        from numba import config, cuda

        if config.ENABLE_CUDASIM:
            return {"ok": False, "reason": "numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM): no timings"}
        if not cuda.is_available():
            return {"ok": False, "reason": "numba.cuda.is_available() is False"}
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        return {"ok": True, "name": name}
    except Exception as exc:  # any failure of the CUDA stack means: no numba CUDA here
        return {"ok": False, "reason": f"numba CUDA: {type(exc).__name__}: {exc}"}


def _onnxruntime_cuda() -> dict:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"ok": False, "reason": f"onnxruntime not installed: {exc}"}
    prov = ort.get_available_providers()
    if "CUDAExecutionProvider" not in prov:
        return {"ok": False, "reason": f"onnxruntime has no CUDAExecutionProvider (providers: {prov}; the 'gpu' extra "
                                       "installs onnxruntime-gpu)"}
    return {"ok": True, "providers": prov}


def _torch_cuda() -> dict:
    if importlib.util.find_spec("torch") is None:
        return {"ok": False, "reason": "torch not installed (optional)"}
    try:
        import torch

        if not torch.cuda.is_available():
            return {"ok": False, "reason": f"torch {torch.__version__}: torch.cuda.is_available() is False"}
        return {"ok": True, "name": torch.cuda.get_device_name(0)}
    except Exception as exc:
        return {"ok": False, "reason": f"torch CUDA: {type(exc).__name__}: {exc}"}


def detect() -> dict:
    """What GPU support there is here.

    Returns
    -------
    dict: ``available`` (bool: a backend that can time stages), ``name`` (the GPU's name, or ``None``),
    ``backends`` (``nvidia_smi``, ``numba_cuda``, ``onnxruntime_cuda``, ``torch_cuda``: each ``{"ok": bool,
    ...}`` with a ``reason`` when not ok), ``reason`` (why nothing can run, when not available).
    """
    b = {"nvidia_smi": _nvidia_smi(), "numba_cuda": _numba_cuda(), "onnxruntime_cuda": _onnxruntime_cuda(),
         "torch_cuda": _torch_cuda()}
    name = next((v["name"] for v in b.values() if v.get("ok") and v.get("name")), None)
    ok = b["numba_cuda"]["ok"] or b["onnxruntime_cuda"]["ok"]
    out = {"available": bool(ok), "name": name, "backends": b}
    if not ok:
        out["reason"] = "; ".join(f"{k}: {v['reason']}" for k, v in b.items() if not v["ok"])
    return out


# --------------------------------------------------------------------------------------------------
# numba CUDA kernels: compiled at their first launch, so importing this module needs no CUDA device.
# (Module-level functions: numba's CUDA simulator swaps the ``cuda`` global of a kernel, not a closure's.)


@cuda.jit(device=True)
def _reflect(i, n):
    # scipy.ndimage "reflect", as beamloop.edge.stages.preprocess._reflect
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


@cuda.jit
def _smooth_rows(src, k, tmp):
    i, j = cuda.grid(2)
    rows, cols = src.shape
    if i < rows and j < cols:
        r = (k.shape[0] - 1) // 2
        acc = k[0] * float32(src[i, _reflect(j - r, cols)])
        for t in range(1, k.shape[0]):
            acc += k[t] * float32(src[i, _reflect(j - r + t, cols)])
        tmp[i, j] = acc


@cuda.jit
def _smooth_cols(tmp, k, dst):
    i, j = cuda.grid(2)
    rows, cols = tmp.shape
    if i < rows and j < cols:
        r = (k.shape[0] - 1) // 2
        acc = k[0] * tmp[_reflect(i - r, rows), j]
        for t in range(1, k.shape[0]):
            acc += k[t] * tmp[_reflect(i - r + t, rows), j]
        dst[i, j] = acc


@cuda.jit
def _noise_sum(img, step, acc):
    # sum of |Immerkaer operator| over rows 1, 1 + step, ... < rows - 1 and columns 1 .. cols - 2; each
    # thread sums a strided share, the block reduces in shared memory, one atomic add per block
    rows, cols = img.shape
    nr = (rows - 2 + step - 1) // step
    total = nr * (cols - 2)
    part = cuda.shared.array(THREADS_1D, dtype=float64)
    tid = cuda.threadIdx.x
    s = 0.0
    idx = cuda.grid(1)
    stride = cuda.gridsize(1)
    while idx < total:
        i = 1 + (idx // (cols - 2)) * step
        j = 1 + idx % (cols - 2)
        v = (float64(img[i - 1, j - 1]) - 2.0 * img[i - 1, j] + img[i - 1, j + 1]
             - 2.0 * img[i, j - 1] + 4.0 * img[i, j] - 2.0 * img[i, j + 1]
             + img[i + 1, j - 1] - 2.0 * img[i + 1, j] + img[i + 1, j + 1])
        s += abs(v)
        idx += stride
    part[tid] = s
    cuda.syncthreads()
    half = THREADS_1D // 2
    while half > 0:
        if tid < half:
            part[tid] += part[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        cuda.atomic.add(acc, 0, part[0])


class GpuPreprocessor:
    """:class:`beamloop.edge.stages.preprocess.Preprocessor` on a CUDA device (numba): Gaussian smoothing and noise sigma,
    device buffers allocated once per frame shape.

    Parameters
    ----------
    sigma_px : float
        Gaussian sigma, pixels (:func:`beamloop.edge.stages.preprocess.gaussian_kernel`).
    noise_row_step : int
        As :class:`beamloop.edge.stages.preprocess.Preprocessor`.

    Raises
    ------
    RuntimeError
        No CUDA device (``numba.cuda.is_available()`` is False).
    """

    def __init__(self, sigma_px: float, noise_row_step: int = 2) -> None:
        from beamloop.edge.stages.preprocess import gaussian_kernel

        if not cuda.is_available():
            raise RuntimeError("no CUDA device (numba.cuda.is_available() is False)")
        self.kernel = gaussian_kernel(sigma_px)
        self.d_kernel = cuda.to_device(self.kernel)
        self.noise_row_step = int(noise_row_step)
        self._key = None
        self.smooth = None

    def _allocate(self, shape, dtype) -> None:
        self.d_src = cuda.device_array(shape, dtype)
        self.d_tmp = cuda.device_array(shape, np.float32)
        self.d_dst = cuda.device_array(shape, np.float32)
        self.d_acc = cuda.device_array(1, np.float64)
        self.smooth = cuda.pinned_array(shape, np.float32) if hasattr(cuda, "pinned_array") else np.empty(shape, np.float32)
        self._zero = np.zeros(1, np.float64)
        self._key = (shape, np.dtype(dtype))

    def upload(self, frame: np.ndarray) -> None:
        """Copy ``frame`` ((rows, cols), integer or float32/float64) to the device.

        Raises ``beamloop.edge.stages.preprocess.FrameError`` for a frame that is not 2-D or smaller than 3 x 3."""
        from beamloop.edge.stages.preprocess import FrameError

        if frame.ndim != 2 or min(frame.shape) < max(3, self.kernel.shape[0] // 2 + 1):
            raise FrameError(f"frame of shape {frame.shape} cannot be smoothed with a {self.kernel.shape[0]}-tap kernel")
        if self._key != (frame.shape, frame.dtype):
            self._allocate(frame.shape, frame.dtype)
        self.d_src.copy_to_device(np.ascontiguousarray(frame))

    def run_device(self) -> None:
        """Smooth the uploaded frame and sum the noise operator on the device (then synchronise)."""
        rows, cols = self.d_src.shape
        grid = (math.ceil(rows / THREADS_2D[0]), math.ceil(cols / THREADS_2D[1]))
        _smooth_rows[grid, THREADS_2D](self.d_src, self.d_kernel, self.d_tmp)
        _smooth_cols[grid, THREADS_2D](self.d_tmp, self.d_kernel, self.d_dst)
        self.d_acc.copy_to_device(self._zero)
        nr = (rows - 2 + self.noise_row_step - 1) // self.noise_row_step
        blocks = max(min(math.ceil(nr * (cols - 2) / THREADS_1D), 1024), 1)
        _noise_sum[blocks, THREADS_1D](self.d_src, self.noise_row_step, self.d_acc)
        cuda.synchronize()

    def download(self) -> tuple[np.ndarray, float]:
        """The smoothed frame ((rows, cols) float32, a reused host buffer) and the noise sigma."""
        rows, cols = self.d_src.shape
        self.d_dst.copy_to_host(self.smooth)
        acc = float(self.d_acc.copy_to_host()[0])
        nr = (rows - 2 + self.noise_row_step - 1) // self.noise_row_step
        return self.smooth, math.sqrt(math.pi / 2.0) * acc / (6.0 * nr * (cols - 2))

    def run(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Upload, process and download one frame: ``(smooth, noise)`` as :meth:`Preprocessor.run` returns."""
        self.upload(frame)
        self.run_device()
        return self.download()


def classical_stage_table(sizes=(256, 512, 1024), repeats: int = 200, pixel_size_A: float = 0.15) -> dict:
    """Per frame size: stage summaries (:func:`beamloop.bench.stats.stage_summary`) of h2d, preprocess (GPU), d2h,
    find and classify (CPU) over ``repeats`` runs on a simulated MoS2 frame (after one warm-up run)."""
    from beamloop.bench.stats import recorder_of, stage_summary
    from beamloop.edge.stages.classify import MoS2Classifier
    from beamloop.edge.stages.find import ColumnFinder, FinderConfig
    from beamloop.edge.path import MOS2_SPACING_A
    from beamloop.edge.sim.frames import mos2_frame

    cfg = FinderConfig.for_pixel_size(pixel_size_A, spacing_A=MOS2_SPACING_A)
    out = {}
    for n in sizes:
        frame = mos2_frame((n, n), pixel_size_A, 1e5, seed=900 + n).counts
        gp = GpuPreprocessor(cfg.sigma_px)
        finder = ColumnFinder(cfg)
        clf = MoS2Classifier(MOS2_SPACING_A / pixel_size_A)
        names = ("h2d", "preprocess", "d2h", "find", "classify")
        ns = {k: [] for k in names}
        for r in range(repeats + 1):
            t = [time.perf_counter_ns()]
            gp.upload(frame)
            t.append(time.perf_counter_ns())
            gp.run_device()
            t.append(time.perf_counter_ns())
            smooth, noise = gp.download()
            t.append(time.perf_counter_ns())
            cols = finder.find_smoothed(smooth, noise)
            t.append(time.perf_counter_ns())
            clf.classify(cols, smooth)
            t.append(time.perf_counter_ns())
            if r:
                for k, d in zip(names, np.diff(t)):
                    ns[k].append(int(d))
        out[f"{n}x{n}"] = {"stages": stage_summary(recorder_of(ns)), "columns": len(cols)}
    return out


def unet_stage_table(sizes=(256, 1024), repeats: int = 50, pixel_size_A: float = 0.15) -> dict:
    """Per frame size: the U-Net path's stage summaries on ONNX Runtime's CUDA provider.

    Raises whatever :class:`beamloop.edge.stages.unet.UNetFinder` raises when no model is installed."""
    from beamloop.bench.stats import recorder_of, stage_summary
    from beamloop.edge.path import FramePipeline
    from beamloop.edge.stages.unet import UNetFinder
    from beamloop.edge.sim.frames import mos2_frame

    pipe = FramePipeline("MoS2", method="unet", unet=UNetFinder(device="cuda"))
    out = {}
    for n in sizes:
        frame = mos2_frame((n, n), pixel_size_A, 1e5, seed=900 + n).counts
        pipe.process(frame, pixel_size_A)
        ns: dict = {}
        for _ in range(repeats):
            for k, v in pipe.process(frame, pixel_size_A).timings_ns.items():
                ns.setdefault(k, []).append(int(v))
        out[f"{n}x{n}"] = {"stages": stage_summary(recorder_of(ns))}
    return out


def run(quick: bool = False) -> dict:
    """Detect the GPU and, when there is one, measure the stage tables; returns the results (with
    ``device`` = the GPU's name) or ``{"skipped": reason, "detection": ...}``."""
    det = detect()
    if not det["available"]:
        return {"skipped": f"no usable NVIDIA GPU here: {det['reason']}", "detection": det}
    out = {"device": det["name"], "detection": det}
    if det["backends"]["numba_cuda"]["ok"]:
        try:
            out["classical_numba_cuda"] = classical_stage_table(repeats=30 if quick else 300)
        except Exception as exc:  # a broken CUDA toolchain must not lose the rest of the suite
            out["classical_numba_cuda"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    else:
        out["classical_numba_cuda"] = {"skipped": det["backends"]["numba_cuda"]["reason"]}
    if det["backends"]["onnxruntime_cuda"]["ok"]:
        try:
            out["unet_onnxruntime_cuda"] = unet_stage_table(repeats=10 if quick else 100)
        except Exception as exc:
            out["unet_onnxruntime_cuda"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    else:
        out["unet_onnxruntime_cuda"] = {"skipped": det["backends"]["onnxruntime_cuda"]["reason"]}
    return out
