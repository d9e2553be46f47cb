"""The hls4ml path: QONNX -> hls4ml (Vitis backend) -> C simulation, and HLS synthesis where Vitis exists.

hls4ml 1.3's PyTorch frontend rejects Brevitas layers ("Unsupported layer QuantIdentity"), so the path goes
through the QONNX graph (hls4ml: J. Duarte et al., "Fast inference of deep neural networks in FPGAs for
particle physics", JINST 13, P07027 (2018); its QONNX frontend: A. Pappalardo et al., arXiv:2206.07527 (2022)).
``io_parallel`` for dense models, ``io_stream`` for convolutional ones (a ``Conv`` node in the graph). The
input layer's precision is widened to ``fixed<input_bits + 8 (+1 if signed), input_bits + ...>`` with
rounding and saturation: hls4ml's default ``fixed<16,6>`` truncates float inputs before the model's own
quantiser (measured in this project: 93.6 % of C-simulation outputs exact with the default, 100 %
once widened). ``compile()`` builds the C emulation library with g++; ``build()`` (HLS
synthesis, latency/II and resource reports) runs only where ``vitis-run`` or ``vivado`` is on PATH and is
otherwise reported as skipped with the reason.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

VENDOR_TOOLS = ("vitis-run", "vitis_hls", "vivado")
"""Executables whose presence enables :func:`hls_build`."""


@dataclass
class HLSResult:
    """Outcome of the hls4ml path.

    Attributes
    ----------
    samples, exact : int
        C-simulation inputs compared with QONNX and exact matches.
    bit_exact_fraction : float
    io_type, backend, part : str
    compile_seconds : float
    build : dict
        HLS synthesis figures (latency cycles, II, LUT, FF, DSP, BRAM) or ``{'status': 'skipped: ...'}``.
    project : str
        hls4ml project folder.
    """

    samples: int = 0
    exact: int = 0
    bit_exact_fraction: float = 0.0
    io_type: str = "io_parallel"
    backend: str = "Vitis"
    part: str = ""
    compile_seconds: float = 0.0
    build: dict = field(default_factory=dict)
    project: str = ""

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def convert(qonnx_path: str | Path, out_dir: str | Path, part: str = "xcu250-figd2104-2L-e", clock_ns: float = 5.0,
            io_type: str | None = None):
    """Convert a QONNX file to an hls4ml model (Vitis backend).

    Parameters
    ----------
    qonnx_path : str or Path
    out_dir : str or Path
        hls4ml project folder.
    part : str
        Xilinx part number for the HLS project.
    clock_ns : float
        Target clock period, ns.
    io_type : {'io_parallel', 'io_stream'}, optional
        Default: ``io_stream`` if the graph has a ``Conv`` node, else ``io_parallel``.

    Returns
    -------
    hls4ml.model.ModelGraph

    Raises
    ------
    FileNotFoundError
        ``qonnx_path`` is missing.
    """
    import hls4ml
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    qonnx_path = Path(qonnx_path)
    if not qonnx_path.is_file():
        raise FileNotFoundError(f"QONNX model {qonnx_path} does not exist")
    m = cleanup_model(ModelWrapper(str(qonnx_path)))
    has_conv = any(n.op_type == "Conv" for n in m.graph.node)
    if has_conv:
        from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean

        m = m.transform(ConvertToChannelsLastAndClean())
    if io_type is None:
        io_type = "io_stream" if has_conv else "io_parallel"
    cfg = hls4ml.utils.config.config_from_onnx_model(m, granularity="name", backend="Vitis",
                                                      default_precision="fixed<16,6>")
    iname = m.graph.input[0].name
    first = next((n for n in m.graph.node if n.input and n.input[0] == iname and n.op_type == "Quant"), None)
    in_bits = int(m.get_initializer(first.input[3])) if first is not None else 16
    signed = next((a.i for a in first.attribute if a.name == "signed"), 1) if first is not None else 1
    cfg["LayerName"].setdefault(iname, {}).setdefault("Precision", {})["result"] = (
        f"fixed<{in_bits + 9 + signed},{in_bits + 1 + signed},RND_CONV,SAT>")
    return hls4ml.converters.convert_from_onnx_model(m, output_dir=str(out_dir), io_type=io_type, backend="Vitis",
                                                     hls_config=cfg, part=part, clock_period=clock_ns)


def vendor_tool() -> str | None:
    """The first of :data:`VENDOR_TOOLS` on PATH, or None."""
    return next((t for t in VENDOR_TOOLS if shutil.which(t)), None)


def hls_build(hls_model) -> dict:
    """Run hls4ml ``build()`` (C synthesis) when a vendor tool is on PATH and parse its report.

    Returns
    -------
    dict
        ``{'status': 'built', 'latency_cycles', 'ii', 'lut', 'ff', 'dsp', 'bram', 'report'}`` or
        ``{'status': 'skipped: ...'}`` naming what is missing.
    """
    tool = vendor_tool()
    if tool is None:
        return {"status": f"skipped: none of {', '.join(VENDOR_TOOLS)} is on PATH (AMD/Xilinx Vitis HLS is "
                          "not installable here); C simulation only"}
    rep = hls_model.build(csim=False, synth=True, export=False)
    csr = (rep or {}).get("CSynthesisReport", {})

    def num(k):
        try:
            return int(csr[k])
        except (KeyError, TypeError, ValueError):
            return None

    return {"status": "built", "tool": tool, "latency_cycles": num("WorstLatency"), "ii": num("IntervalMax"),
            "lut": num("LUT"), "ff": num("FF"), "dsp": num("DSP") if num("DSP") is not None else num("DSP48E"),
            "bram": num("BRAM_18K"), "report": csr}


def hls_check(qonnx_path: str | Path, x: np.ndarray, reference: np.ndarray, out_dir: str | Path,
              part: str = "xcu250-figd2104-2L-e", build: bool = True, progress=print) -> HLSResult:
    """Convert, C-simulate and compare with QONNX; build with HLS when the vendor tool exists.

    Parameters
    ----------
    qonnx_path : str or Path
    x : ndarray, shape (n, n_inputs)
        Inputs in the graph's units.
    reference : ndarray, shape (n,) or (n, n_outputs)
        QONNX outputs on ``x``.
    out_dir : str or Path
    part : str
        Xilinx part.
    build : bool
        Try ``build()`` (skipped with a reason when no vendor tool is found).
    progress : callable

    Returns
    -------
    HLSResult
    """
    progress("hls4ml: converting QONNX (Vitis backend)")
    hm = convert(qonnx_path, out_dir, part=part)
    t0 = time.perf_counter()
    progress("hls4ml: compile() C simulation library (g++)")
    hm.compile()
    dt = time.perf_counter() - t0
    y = np.asarray(hm.predict(np.ascontiguousarray(np.asarray(x, np.float32))), np.float64).reshape(len(x), -1)
    ref = np.asarray(reference, np.float64).reshape(len(x), -1)
    exact = int(np.sum(np.all(y == ref, axis=1)))
    res = HLSResult(samples=len(x), exact=exact, bit_exact_fraction=exact / max(len(x), 1),
                    io_type=hm.config.get_config_value("IOType"), part=part, compile_seconds=dt, project=str(out_dir))
    progress(f"hls4ml: C simulation {exact}/{len(x)} bit-exact ({dt:.0f} s to compile)")
    res.build = hls_build(hm) if build else {"status": "skipped: not requested"}
    progress(f"hls4ml: build {res.build['status']}")
    return res
