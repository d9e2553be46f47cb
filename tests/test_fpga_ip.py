"""The whole ejection trigger as FPGA logic (fpga/ip.py): raw ADF samples through AXI4-Stream, history, block
sums, the model, threshold and latching blank, checked sample for sample against the integer runtime
(edge/trigger/model.py) on simulated parked-probe dwells (quantize/data.py), and its register block on both
buses (Wishbone B4 classic and AXI4-Lite), in cocotb + Icarus."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("da4ml")

from beamloop.edge.trigger.model import (  # noqa: E402
    MODEL_DIR,
    NO_SCORE,
    FeatureSpec,
    IntegerMLP,
    ModelTrigger,
    load_manifest,
    rate_word,
)
from beamloop.fpga.ip import (  # noqa: E402
    ID_WORD,
    REGISTERS,
    model_id,
    reference_parts,
    register_table_md,
    sample_clip,
    trace_parts,
    write_ip,
)
from beamloop.fpga.ip_sim import Dwells  # noqa: E402

needs_icarus = pytest.mark.skipif(shutil.which("iverilog") is None, reason="Icarus Verilog not installed")


def _sim_dwells(n: int, length: int, seed: int) -> Dwells:
    """Simulated parked-probe dwells with the training nuisances, an event anywhere (also in the first history),
    every other dwell started with its expected rate."""
    from beamloop.quantize.data import check_dwells

    st = check_dwells(n, length, seed)
    rates = np.where(np.arange(n) % 2 == 1, st.rate0, np.nan)
    return Dwells([np.asarray(c) for c in st.counts], rates, st.event)


@pytest.fixture(scope="module")
def shipped_ip(tmp_path_factory):
    """The shipped ejection trigger's IP at the default cutoff."""
    return write_ip("ejection", tmp_path_factory.mktemp("ip") / "ip")


def _features_as_held(x: np.ndarray, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """What the logic feeds its two pipelines for each decision: clipped older window samples, running block sums
    of clipped samples, and the newest sample clipped to the input range."""
    xc = np.minimum(x, sample_clip(spec))
    h, w = spec.history, spec.window
    ends = np.arange(h - 1, len(x))
    older = np.stack([xc[ends - (w - 1) + i] for i in range(w - 1)], 1)
    cs = np.concatenate([[0], np.cumsum(xc)])
    first = ends - h + 1
    sums = np.stack([cs[first + (j + 1) * spec.block] - cs[first + j * spec.block] for j in range(spec.blocks)], 1)
    return np.concatenate([older, sums], 1), np.minimum(x[ends], spec.input_max)


def test_split_network_is_bit_exact_with_the_runtime():
    """The precompute (everything but the newest sample) plus the tail give the runtime's score exactly, on
    simulated dwells and on counts far above the input range."""
    t = ModelTrigger()
    pre, tail = trace_parts(t.spec, t.mlp)
    x = np.concatenate([np.asarray(c, np.int64) for c in _sim_dwells(6, 1500, seed=3).counts])
    rng = np.random.default_rng(1)
    x[rng.integers(0, len(x), 300)] = rng.integers(256, 65536, 300)  # saturating samples
    ref = t.stream_scores(x)[t.spec.history - 1:]
    f, newest = _features_as_held(x, t.spec)
    got = reference_parts(pre, tail, t.spec, f, newest, threshold=1080)
    assert got.shape == (len(x) - 159, 2) and np.array_equal(got[:, 0], ref)
    assert np.array_equal(got[:, 1], ref - 1080)  # the decision is the sign of score - threshold
    assert len(np.unique(ref)) > 1000
    pre1, tail1 = trace_parts(t.spec, t.mlp, threshold_input=False)  # the score alone, compared after the tail
    assert np.array_equal(reference_parts(pre1, tail1, t.spec, f, newest), ref)


def test_ip_layout_and_register_map(shipped_ip):
    d = shipped_ip
    assert d.latency_cycles == d.tail.stages + 1 and d.min_interval == d.pre.stages + 3
    assert d.prefill_cycles == 160 + d.pre.stages + 3 and d.sample_clip == 1023
    assert d.threshold == load_manifest()["models"]["ejection"]["threshold"]["score"] == 1080
    assert d.model_id == model_id(MODEL_DIR / "ejection_int.npz")
    core = Path(d.out_dir, "src", "ejection_core.v").read_text()
    for port in ("s_axis_tdata", "s_axis_tvalid", "s_axis_tready", "blank", "score_valid", "reg_wstrb"):
        assert port in core
    cfg = (160 << 16) | (d.min_interval << 8) | d.latency_cycles
    assert f"32'h{cfg:08X}" in core and f"32'h{ID_WORD:08X}" in core and f"32'h{d.model_id:08X}" in core
    wb = Path(d.out_dir, "src", "ejection_ip_wb.v").read_text()
    axil = Path(d.out_dir, "src", "ejection_ip_axil.v").read_text()
    assert all(s in wb for s in ("wb_cyc_i", "wb_stb_i", "wb_ack_o", "wb_sel_i"))
    assert all(s in axil for s in ("s_axil_awready", "s_axil_wstrb", "s_axil_bresp", "s_axil_rdata"))
    assert [r.offset for r in REGISTERS] == list(range(0, 4 * len(REGISTERS), 4))
    # the README's register map is the one the logic implements
    readme = (Path(__file__).resolve().parents[1] / "fpga" / "README.md").read_text()
    assert register_table_md() in readme


@needs_icarus
def test_ip_streams_dwells_bit_exact_with_the_runtime(shipped_ip, tmp_path):
    """A few simulated dwells through the Wishbone top: every score, undecided sample and firing sample."""
    pytest.importorskip("cocotb")
    from beamloop.fpga.ip_sim import simulate_stream

    dw = _sim_dwells(4, 500, seed=11)
    r = simulate_stream(shipped_ip, dw, tmp_path, progress=lambda s: None)
    assert (r.dwells, r.samples) == (4, 2000)
    assert r.decided == 2000 - 2 * 159 and r.exact == r.decided and r.mismatches == []
    assert r.decided_flags_equal and r.fire_flags_equal and r.counters_ok
    assert r.firing_sample_equal == 4 and r.dwells_fired >= 1 and r.all_exact
    assert r.latency_cycles == r.latency_cycles_hw == shipped_ip.latency_cycles


def _expected_register_scores(samples):
    t = ModelTrigger("ejection")  # the model of the shipped_ip fixture
    t.start(7.5)
    _, a = t.update_scores(np.asarray(samples[:10]))
    return a


@needs_icarus
@pytest.mark.parametrize("bus", ["wb", "axil"])
def test_ip_registers(shipped_ip, tmp_path, bus):
    """Every register through the bus: reset values, read-back, byte lanes, read-only registers, START with an
    expected rate, rearm (write 1 to clear), ENABLE, the counters."""
    pytest.importorskip("cocotb")
    from beamloop.fpga.ip_sim import simulate_registers

    d = shipped_ip
    r = simulate_registers(d, tmp_path, bus=bus, progress=lambda s: None)
    cfg = (160 << 16) | (d.min_interval << 8) | d.latency_cycles
    reset = {"ID": 0x424C0100, "CTRL": 0, "STATUS": 0x2, "THRESHOLD": 1080, "EXPECTED_RATE": 0, "TRIGGER_COUNT": 0,
             "SAMPLE_COUNT": 0, "LAST_TRIGGER_SAMPLE": 0xFFFFFFFF, "LATENCY": 0, "LAST_SCORE": 0,
             "MODEL_ID": d.model_id, "CONFIG": cfg}
    assert {k[6:]: v for k, v in r.items() if k.startswith("reset_")} == reset
    assert (r["rw_THRESHOLD"], r["rw_EXPECTED_RATE"], r["rw_TRIGGER_COUNT"]) == (0x89ABCDEF, 0x00012345, 7)
    assert r["lanes_THRESHOLD"] == 0x8922CD44  # lanes 0 and 2 of 0x11223344 over 0x89ABCDEF
    if bus == "axil":
        assert r["data_first_EXPECTED_RATE"] == 0x00020000
    for name in ("ID", "SAMPLE_COUNT", "LAST_TRIGGER_SAMPLE", "LATENCY", "LAST_SCORE", "MODEL_ID", "CONFIG"):
        assert r[f"ro_{name}"] == reset[name], name
    assert r["ctrl_enable"] == 1
    assert r["status_prefill"] == 0x8 and r["status_after_prefill"] == 0x6  # PREFILL, then READY | HISTORY_FULL
    scores = _expected_register_scores(r["samples"])
    # THRESHOLD = -2**31: every decided sample fires; the expected rate makes sample 0 decided
    assert (r["fired_STATUS"], r["fired_SAMPLE_COUNT"], r["fired_LAST_TRIGGER_SAMPLE"], r["fired_TRIGGER_COUNT"]) == \
        (0x7, 5, 0, 1)
    assert r["fired_LATENCY"] == d.latency_cycles
    assert r["fired_LAST_SCORE"] == int(scores[4]) & 0xFFFFFFFF
    assert r["status_no_rearm"] == 0x7 and r["status_rearmed"] == 0x6
    assert (r["refired_STATUS"], r["refired_SAMPLE_COUNT"], r["refired_LAST_TRIGGER_SAMPLE"],
            r["refired_TRIGGER_COUNT"]) == (0x7, 8, 5, 2)
    assert (r["disabled_STATUS"], r["disabled_SAMPLE_COUNT"], r["disabled_TRIGGER_COUNT"]) == (0x6, 10, 2)
    assert (r["restart_STATUS"], r["restart_SAMPLE_COUNT"], r["restart_LAST_TRIGGER_SAMPLE"]) == (0x2, 0, 0xFFFFFFFF)
    assert r["nostart_STATUS"] == 0x2  # 4 samples after a START without a rate: not full, nothing fired
    rows = np.array(r["scores"])
    assert np.array_equal(rows[:10, 0], scores) and np.all(rows[:10, 1:3] == 1)
    assert rows[:, 3].tolist() == [1] * 8 + [0] * 6  # latched 0-4, rearmed and latched 5-7, disabled, restarted
    assert np.all(rows[10:, :3] == 0)  # not decided after the START without a rate


def _tiny_model(d: Path, seed: int = 0) -> FeatureSpec:
    """A random integer network with a feature spec in its own model folder (the IP needs no training)."""
    spec = FeatureSpec(window=6, blocks=2, block=8, shift=2, input_bits=8)
    rng = np.random.default_rng(seed)
    mlp = IntegerMLP([rng.integers(-31, 32, (6, spec.n_features)), rng.integers(-31, 32, (1, 6))],
                     [rng.integers(-500, 500, 6), rng.integers(-500, 500, 1)], np.array([-4]), np.array([255]),
                     2.0 ** -8, spec.input_max)
    d.mkdir(parents=True, exist_ok=True)
    mlp.save(d / "tiny_int.npz")
    (d / "manifest.json").write_text(json.dumps({"format": 1, "models": {"tiny": {
        "files": {"integer": "tiny_int.npz"}, "features": spec.as_dict(), "threshold": {"score": 300}}}}))
    return spec


@needs_icarus
@pytest.mark.parametrize("history", ["sr", "lutram"])
def test_cli_fpga_sim_streams_a_model_folder(tmp_path, history):
    """``beamloop fpga sim DIR`` on a model folder: both history implementations, the register map in the report."""
    pytest.importorskip("cocotb")
    from beamloop.edge.cli import main

    _tiny_model(tmp_path / "m")
    out = tmp_path / "o"
    if history == "sr":  # simulated parked-probe dwells from `beamloop quantize streams`
        assert main(["quantize", "streams", "--out", str(tmp_path / "d.npz"), "--dwells", "3", "--length", "300"]) == 0
        source = ["--stream", str(tmp_path / "d.npz")]
    else:  # the synthetic Poisson dwells
        source = ["--dwells", "3", "--dwell-samples", "300"]
    assert main(["fpga", "sim", str(tmp_path / "m"), "--out", str(out), "--history", history, "--latency-cutoff", "2",
                 *source]) == 0
    rep = json.loads((out / "report.json").read_text())
    s = rep["sim"]
    assert s["all_exact"] and s["samples"] == 900 and s["exact"] == s["decided"] == 900 - 2 * 21
    assert s["latency_cycles"] == rep["rtl"]["stages"] + 1 and rep["rtl"]["history_impl"] == history
    md = (out / "report.md").read_text()
    assert "| 0x2C | CONFIG | RO |" in md and re.search(r"firing sample equal in 3 / 3 dwells", md)


def test_quantize_ship_copies_a_trained_model(tmp_path, monkeypatch):
    """``beamloop quantize ship`` copies a model folder's files and manifest entry into the package folder."""
    import beamloop.quantize.cli as qcli
    from beamloop.edge.cli import main

    _tiny_model(tmp_path / "trained")
    monkeypatch.setattr(qcli, "MODEL_DIR", tmp_path / "package")
    assert main(["quantize", "ship", "tiny", "--model-dir", str(tmp_path / "trained")]) == 0
    assert (tmp_path / "package" / "tiny_int.npz").is_file()
    assert load_manifest(tmp_path / "package")["models"]["tiny"]["threshold"]["score"] == 300
    assert main(["quantize", "ship", "absent", "--model-dir", str(tmp_path / "trained")]) == 1


def test_record_logic_feeds_the_runtime_latency(tmp_path):
    """``fpga build --record`` stores the latency at the rated clock; ModelTrigger reads it for the emulation."""
    from beamloop.fpga.flow import record_logic

    _tiny_model(tmp_path)
    rep = {"synth": {"fmax_mhz": 104.37, "target_mhz": 100.0, "target": "ecp5-85k", "part": "LFE5U-85F-6BG381C"},
           "sim": {"latency_cycles": 9}, "rtl": {"latency_cycles": 9, "min_interval_cycles": 12, "latency_cutoff": 1.0}}
    record_logic("tiny", tmp_path, rep)
    t = ModelTrigger("tiny", model_dir=tmp_path)
    assert t.logic_latency_cycles == 9 and t.logic_latency_ns == 90.0  # 9 cycles at the 100 MHz it meets
    assert t.logic["latency_ns_at_fmax"] == pytest.approx(86.23, abs=0.01)
    rep["synth"]["fmax_mhz"] = 87.66  # misses 100 MHz: rated at fmax, rounded down
    record_logic("tiny", tmp_path, rep)
    t = ModelTrigger("tiny", model_dir=tmp_path)
    assert t.logic["clock_mhz"] == 87.6 and t.logic_latency_ns == pytest.approx(9 * 1000 / 87.6, abs=0.01)
    with pytest.raises(ValueError, match="place-and-route"):
        record_logic("tiny", tmp_path, {"synth": {}})


def test_rate_word_is_the_register_format():
    # EXPECTED_RATE holds rate_word: unsigned, 16 fractional bits
    assert rate_word(7.5) == 7 * 65536 + 32768
    assert next(r for r in REGISTERS if r.name == "EXPECTED_RATE").offset == 0x10
    assert NO_SCORE < -(2 ** 61)


@pytest.mark.slow
@needs_icarus
def test_ip_streams_200_dwells_bit_exact_with_the_runtime(shipped_ip, tmp_path):
    """200 simulated dwells of 1000 samples (200,000 samples) through the IP, every score compared."""
    pytest.importorskip("cocotb")
    from beamloop.fpga.ip_sim import simulate_stream

    dw = _sim_dwells(200, 1000, seed=500)
    r = simulate_stream(shipped_ip, dw, tmp_path, progress=lambda s: None)
    assert (r.dwells, r.samples) == (200, 200_000)
    assert r.decided == 200_000 - 100 * 159 and r.exact == r.decided and r.mismatches == []
    assert r.firing_sample_equal == 200 and r.dwells_fired > 100 and r.all_exact
    assert r.latency_cycles == r.latency_cycles_hw == shipped_ip.latency_cycles


@pytest.mark.slow
@needs_icarus
def test_cli_fpga_build_ip_to_bitstream(tmp_path):
    """``beamloop fpga build DIR --target ecp5-85k``: the IP of a small model simulated, placed, routed and packed,
    the report with fmax, latency_ns and the bit-exact fraction, the latency recorded in the manifest."""
    pytest.importorskip("cocotb")
    from beamloop.edge.cli import main

    _tiny_model(tmp_path / "m")
    out = tmp_path / "b"
    assert main(["fpga", "build", str(tmp_path / "m"), "--target", "ecp5-85k", "--out", str(out), "--dwells", "2",
                 "--dwell-samples", "200", "--record"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["sim"]["bit_exact_fraction"] == 1.0 and rep["sim"]["all_exact"]
    syn = rep["synth"]
    assert syn["fmax_mhz"] > 50 and syn["lut4"] > 100 and syn["ff"] > 300
    assert rep["latency_ns"] == pytest.approx(rep["sim"]["latency_cycles"] * 1000 / syn["fmax_mhz"])
    assert (out / "ecp5" / "tiny_ip_board.bit").stat().st_size > 100_000
    assert "| 0x2C | CONFIG | RO |" in (out / "report.md").read_text()
    t = ModelTrigger("tiny", model_dir=tmp_path / "m")
    assert t.logic_latency_cycles == rep["sim"]["latency_cycles"] and t.logic["fmax_mhz"] > 50
