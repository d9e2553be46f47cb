"""The GPU section: the frame-path stage table on an NVIDIA GPU, saved with the GPU's name.

Detection (:func:`detect`) asks ``nvidia-smi``, numba (``numba.cuda.is_available()``), ONNX Runtime
(``CUDAExecutionProvider``) and, only when it is installed, torch (``torch.cuda.is_available()``). With
no usable device the section is skipped with the reasons.

On a GPU the classical path is timed per stage with the preprocess stage on the device
(:class:`beamloop.edge.stages.preprocess_gpu.GpuPreprocessor`: the frame uploaded before and the smoothed
frame downloaded after), then the classical path's CPU stages on its output:

    h2d -> preprocess (GPU) -> d2h -> find -> classify -> vacancies (CPU)

and the learned path, when a U-Net model is installed, with ONNX Runtime's CUDA provider
(:class:`beamloop.edge.stages.unet.UNetFinder` ``device="cuda"``). The kernels run under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) too, which is how the tests check them against the CPU kernels here.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time


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


def classical_stage_table(sizes=(256, 512, 1024), repeats: int = 200, pixel_size_A: float = 0.15) -> dict:
    """Per frame size: stage summaries (:func:`beamloop.bench.stats.stage_summary`) of h2d, preprocess (GPU), d2h,
    then the CPU stages find, classify, vacancies of the classical path, over ``repeats`` runs on a
    simulated MoS2 frame (after one warm-up run)."""
    from beamloop.bench.stats import recorder_of, stage_summary
    from beamloop.edge.frame.context import FrameMeta
    from beamloop.edge.materials import MOS2
    from beamloop.edge.path import FramePath, classical_stages
    from beamloop.edge.sim.frames import mos2_frame
    from beamloop.edge.stages.find import FinderConfig
    from beamloop.edge.stages.preprocess_gpu import GpuPreprocessor

    cfg = FinderConfig.for_pixel_size(pixel_size_A, spacing_A=MOS2.nn_spacing_A)
    out = {}
    for n in sizes:
        frame = mos2_frame((n, n), pixel_size_A, 1e5, seed=900 + n).counts
        gp = GpuPreprocessor(cfg.sigma_px)
        cpu = FramePath(classical_stages(MOS2)[1:], MOS2)  # find, classify, vacancies on the GPU's output
        meta = FrameMeta.of(frame, pixel_size_A, MOS2)
        cpu.prepare(meta)
        ctx = cpu.ctx
        names = ("h2d", "preprocess", "d2h", *cpu.names)
        ns: dict = {k: [] for k in names}
        for r in range(repeats + 1):
            t0 = time.perf_counter_ns()
            gp.upload(frame)
            t1 = time.perf_counter_ns()
            gp.run_device()
            t2 = time.perf_counter_ns()
            ctx.image = frame
            ctx.smooth, ctx.noise = gp.download()
            t3 = time.perf_counter_ns()
            times = [t1 - t0, t2 - t1, t3 - t2]
            for s in cpu.stages:
                ta = time.perf_counter_ns()
                s.process(ctx)
                times.append(time.perf_counter_ns() - ta)
            if r:
                for k, d in zip(names, times):
                    ns[k].append(int(d))
        out[f"{n}x{n}"] = {"stages": stage_summary(recorder_of(ns)), "columns": len(ctx.columns)}
    return out


def unet_stage_table(sizes=(256, 1024), repeats: int = 50, pixel_size_A: float = 0.15) -> dict:
    """Per frame size: the U-Net path's stage summaries on ONNX Runtime's CUDA provider.

    Raises whatever :class:`beamloop.edge.stages.unet.UNetFinder` raises when no model is installed."""
    from beamloop.bench.stats import recorder_of, stage_summary
    from beamloop.edge.path import frame_path
    from beamloop.edge.sim.frames import mos2_frame
    from beamloop.edge.stages.unet import UNetFinder

    path = frame_path("unet", "MoS2", unet=UNetFinder(device="cuda"))
    out = {}
    for n in sizes:
        frame = mos2_frame((n, n), pixel_size_A, 1e5, seed=900 + n).counts
        path.run(frame, pixel_size_A, record=False)
        ns: dict = {}
        for _ in range(repeats):
            for k, v in path.run(frame, pixel_size_A, record=False).timings_ns.items():
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
