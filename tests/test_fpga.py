"""FPGA flow on a tiny trigger trained here: QAT (beamloop.quantize.train) -> QONNX (beamloop.quantize.export) -> da4ml
trace,
RTL simulation (cocotb + Icarus), hls4ml C simulation, yosys/nextpnr-ecp5/ecppack; every output compared bit
for bit with the QONNX graph executed by qonnx."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("brevitas")
pytest.importorskip("qonnx")
pytest.importorskip("da4ml")

from beamloop.edge.trigger.model import FeatureSpec  # noqa: E402
from beamloop.fpga.qonnx_trace import TraceError, qonnx_reference, trace_qonnx  # noqa: E402
from beamloop.fpga.report import latency_ns, markdown  # noqa: E402
from beamloop.fpga.rtl import pack_inputs, threshold_word, write_rtl  # noqa: E402
from beamloop.fpga.sim import sample_inputs  # noqa: E402
from beamloop.fpga.synth import critical_path, fmax_from_log, parse_nextpnr_report, parse_yosys_stat  # noqa: E402

needs_icarus = pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus Verilog not installed")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 10-8-1 trigger trained for one float and one QAT epoch on simulated streams, exported to QONNX,
    with a manifest beside it (threshold, accuracy) as the shipped models have."""
    from beamloop.quantize.export import export_qonnx
    from beamloop.quantize.train import TrainConfig, train

    cfg = TrainConfig(spec=FeatureSpec(window=8, blocks=2, block=8, shift=2, input_bits=8), hidden=(8,),
                      segments=120, segment_length=96, windows_per_segment=8, float_epochs=1, qat_epochs=1,
                      mining_rounds=0, batch=256, seed=3)
    res = train(cfg, progress=lambda s: None)
    d = tmp_path_factory.mktemp("tiny")
    export_qonnx(res["quant_model"], cfg.spec.n_features, d / "tiny.onnx")
    (d / "manifest.json").write_text(json.dumps({"format": 1, "models": {"tiny": {
        "files": {"qonnx": "tiny.onnx"}, "threshold": {"logit": 0.5},
        "metrics": {"validation_windows": {"quantized": {"accuracy": 0.75, "auc": 0.8}}}}}}))
    return d / "tiny.onnx"


def test_tracer_is_bit_exact_with_qonnx_on_10000_inputs(tiny):
    tm = trace_qonnx(tiny)
    assert (tm.n_inputs, tm.n_outputs, tm.input_bits, tm.input_signed) == (10, 1, 8, False)
    x = sample_inputs(10_000, tm.n_inputs, tm.input_bits, seed=1)
    ref = qonnx_reference(tiny, x).reshape(-1)
    words = tm.predict_words(x).reshape(-1)
    assert np.array_equal(words * tm.output_step, ref)
    assert len(np.unique(ref)) > 200  # not a constant network
    assert np.abs(words).max() < 2 ** (tm.output_bits - 1)


def test_shipped_ejection_trigger_traces_bit_exact():
    from beamloop.edge.trigger.model import MODEL_DIR

    path = MODEL_DIR / "ejection.onnx"
    tm = trace_qonnx(path)
    x = sample_inputs(3000, tm.n_inputs, tm.input_bits, seed=2)
    assert np.array_equal(tm.predict_words(x).reshape(-1) * tm.output_step, qonnx_reference(path, x).reshape(-1))


def _edit_graph(src, dst, fn):
    from qonnx.core.modelwrapper import ModelWrapper

    m = ModelWrapper(str(src))
    fn(m)
    m.save(str(dst))
    return dst


def test_tracer_refuses_half_even_rounding_of_computed_tensors(tiny, tmp_path):
    def to_round(m):
        for n in m.graph.node:
            for a in n.attribute:
                if a.name == "rounding_mode" and a.s == b"FLOOR":
                    a.s = b"ROUND"

    with pytest.raises(TraceError, match="FLOOR"):
        trace_qonnx(_edit_graph(tiny, tmp_path / "r.onnx", to_round))


def test_tracer_refuses_non_power_of_two_scales_and_unknown_operators(tiny, tmp_path):
    from onnx import helper

    def bad_scale(m):
        q = [n for n in m.graph.node if n.op_type == "Quant" and n.input[0] != m.graph.input[0].name
             and m.get_initializer(n.input[0]) is None][0]
        m.set_initializer(q.input[1], np.array(0.3, np.float32))

    with pytest.raises(TraceError, match="power of two"):
        trace_qonnx(_edit_graph(tiny, tmp_path / "s.onnx", bad_scale))

    def sigmoid(m):
        out = m.graph.output[0].name
        last = [n for n in m.graph.node if out in n.output][0]
        last.output[0] = "pre"
        m.graph.node.append(helper.make_node("Sigmoid", ["pre"], [out]))

    with pytest.raises(TraceError, match="Sigmoid"):
        trace_qonnx(_edit_graph(tiny, tmp_path / "g.onnx", sigmoid))
    with pytest.raises(FileNotFoundError):
        trace_qonnx(tmp_path / "missing.onnx")


def test_threshold_word_and_input_packing():
    assert threshold_word(4.21875, 2 ** -8, 16) == 1080  # the shipped ejection threshold
    assert threshold_word(4.2, 2 ** -8, 16) == 1076  # ceil(4.2 * 256): smallest firing word
    assert threshold_word(-1.0, 0.5, 8) == -2
    assert threshold_word(1e9, 1.0, 8) == 128  # one past the largest score: never fires
    with pytest.raises(ValueError):
        threshold_word(float("nan"), 1.0, 8)
    assert pack_inputs(np.array([[1, 2, 3]]), 8) == [0x030201]
    with pytest.raises(ValueError, match="input words"):
        pack_inputs(np.array([[256]]), 8)


def test_wrapper_rtl_layout(tiny, tmp_path):
    tm = trace_qonnx(tiny)
    d = write_rtl(tm, tmp_path / "rtl", name="tiny", latency_cutoff=2, threshold_logit=0.5)
    assert d.latency_cycles == d.stages + 1 and d.stages >= 2  # stage registers + the folded compare's output register
    assert d.threshold_word == threshold_word(0.5, tm.output_step, tm.output_bits)
    src = (tmp_path / "rtl" / "src" / "tiny_trigger.v").read_text()
    for port in ("in_valid", "in_features", "out_valid", "trigger", "blank", "latency_cycles", "rearm"):
        assert port in src
    one = write_rtl(tm, tmp_path / "rtl1", name="tiny", latency_cutoff=0)
    assert one.stages == 1 and one.latency_cycles == 2
    assert not any(f.endswith("/src/tiny.v") for f in d.sources)  # da4ml's pipeline top is not used


@needs_icarus
def test_cli_model_only_sim_is_bit_exact_and_measures_latency(tiny, tmp_path, capsys):
    pytest.importorskip("cocotb")
    from beamloop.edge.cli import main

    out = tmp_path / "sim"
    assert main(["fpga", "sim", str(tiny), "--model-only", "--out", str(out), "--samples", "600",
                 "--latency-cutoff", "3"]) == 0
    rep = json.loads((out / "report.json").read_text())
    s = rep["sim"]
    assert s["samples"] == 600 and s["exact"] == 600 and s["bit_exact_fraction"] == 1.0
    assert s["decisions_ok"]
    assert s["latency_cycles"] == rep["rtl"]["stages"] + 1 == s["latency_cycles_hw"]
    assert rep["model"]["accuracy"] == 0.75  # from the manifest beside the model
    assert "RTL simulation bit-exact | 600 / 600" in (out / "report.md").read_text()


def test_cli_rejects_missing_model(tmp_path, capsys):
    from beamloop.edge.cli import main

    assert main(["fpga", "sim", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "o")]) == 1
    assert "nope.onnx" in capsys.readouterr().err
    assert main(["fpga", "build", "no_such_model", "--out", str(tmp_path / "o")]) == 1
    assert "no_such_model" in capsys.readouterr().err


def test_report_parsers_and_markdown():
    stat = {"design": {"num_cells_by_type": {"LUT4": 649, "CCU2C": 120, "TRELLIS_FF": 400, "TRELLIS_FF$x": 80,
                                             "MULT18X18D": 2, "DP16KD": 1}}}
    assert parse_yosys_stat(stat) == {"lut4": 649, "carry": 120, "ff": 480, "dsp": 2, "bram": 1, "lutram": 0}
    rep = {"fmax": {"clk$glb_clk": {"achieved": 107.3, "constraint": 100.0}},
           "utilization": {"TRELLIS_IO": {"used": 30, "available": 365}}}
    fmax, util = parse_nextpnr_report(rep)
    assert fmax == 107.3 and util["TRELLIS_IO"]["used"] == 30
    assert latency_ns(13, 100.0) == 130.0 and latency_ns(None, 100.0) is None
    log = ("Info: Critical path report for clock '$glbnet$clk' (posedge -> posedge):\n"
           "Info:   clk-to-q  0.52  0.52 Source core.model.stage1.op_26.Q\n"
           "Info:   routing  0.97  1.49 Net a\nInfo:                          Sink core.model.stage2.op_9.A\n"
           "Info:      logic  0.24  1.73 Source core.model.stage2.op_9.F\n"
           "Info:   routing  2.00  3.73 Net b\nInfo:                          Sink core.model.stage2.op_9.FF.DI\n"
           "Info:      setup  0.20  3.93 Source core.model.stage2.op_9.FF.DI\n"
           "Info: Critical path report for cross-domain path '<async>' -> 'posedge $glbnet$clk':\n"
           "Info:   routing  5.00  5.00 Net c\nInfo:                          Sink other.D\n"
           "Info: Max frequency for clock '$glbnet$clk': 254.45 MHz (PASS at 100.00 MHz)\n")
    assert critical_path(log) == {"source": "core.model.stage1.op_26.Q", "sink": "core.model.stage2.op_9.FF.DI",
                                  "logic_ns": 0.96, "routing_ns": 2.97}
    assert fmax_from_log(log) == 254.45 and critical_path("no timing here") == {}
    md = markdown({"model": {"name": "x", "accuracy": 0.9, "auc": 0.95, "source": "x.onnx"},
                   "synth": {"lut4": 649, "ff": 480, "fmax_mhz": 107.3}, "latency_ns": 130.0,
                   "sim": {"samples": 10, "exact": 10, "bit_exact_fraction": 1.0, "latency_cycles": 13}})
    assert "| LUT4 | 649 |" in md and "| fmax (MHz) | 107.3 |" in md and "10 / 10 (100.0000%)" in md


@pytest.mark.slow
def test_hls4ml_c_simulation_is_bit_exact_on_10000_inputs(tiny, tmp_path):
    pytest.importorskip("hls4ml")
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    from beamloop.fpga.hls import hls_check

    tm = trace_qonnx(tiny)
    x = sample_inputs(10_000, tm.n_inputs, tm.input_bits, seed=4)
    res = hls_check(tiny, x, qonnx_reference(tiny, x), tmp_path / "hls", progress=lambda s: None)
    assert res.samples == 10_000 and res.exact == 10_000
    assert res.io_type == "io_parallel"
    if shutil.which("vitis-run") is None and shutil.which("vivado") is None and shutil.which("vitis_hls") is None:
        assert res.build["status"].startswith("skipped: ")


@pytest.mark.slow
@needs_icarus
def test_qat_to_bitstream_end_to_end(tiny, tmp_path):
    """The whole flow from the command line: 10,000 samples in RTL and C simulation, ECP5-85F bitstream."""
    pytest.importorskip("cocotb")
    pytest.importorskip("hls4ml")
    from beamloop.edge.cli import main

    out = tmp_path / "build"
    assert main(["fpga", "build", str(tiny), "--model-only", "--target", "ecp5-85k", "--out", str(out),
                 "--latency-cutoff", "3"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["sim"]["exact"] == rep["sim"]["samples"] == 10_000
    assert rep["hls"]["exact"] == rep["hls"]["samples"] == 10_000
    syn = rep["synth"]
    assert syn["lut4"] > 50 and syn["ff"] > 80 and syn["fmax_mhz"] > 10
    cp = syn["critical_path"]
    assert cp["source"] and cp["sink"] and cp["logic_ns"] > 0
    assert 1000 / syn["fmax_mhz"] == pytest.approx(cp["logic_ns"] + cp["routing_ns"], rel=0.15)
    bit = out / "ecp5" / f"{rep['rtl']['board_top']}.bit"
    assert bit.is_file() and bit.stat().st_size > 100_000  # an LFE5U-85F bitstream is ~ 1 MB uncompressed
    assert rep["latency_ns"] == pytest.approx(rep["sim"]["latency_cycles"] * 1000 / syn["fmax_mhz"])
