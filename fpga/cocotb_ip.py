"""The cocotb benches that :mod:`beamloop.fpga.ip_sim` runs in Icarus Verilog on the trigger IP (not pytest modules).

Both tops are driven through their own register bus: :class:`WishboneMaster` (Wishbone B4 classic single
reads and writes, OpenCores Wishbone B4 specification, 2010) for ``<n>_ip_wb`` and :class:`AxiLiteMaster`
(AXI4-Lite single transfers, Arm IHI 0022E) for ``<n>_ip_axil``. Inputs change on the falling clock edge;
outputs are read after the rising edge (cocotb ``ReadOnly``).

- ``ip_stream``: dwells of ADF counts through the AXI4-Stream input (``tvalid`` held until ``tready``).
  Per dwell: write EXPECTED_RATE, CTRL = ENABLE | START, wait for ``s_axis_tready``, stream the samples,
  collect every ``score_valid`` output (score, decided, fire, blank), read SAMPLE_COUNT,
  LAST_TRIGGER_SAMPLE, TRIGGER_COUNT, LATENCY and STATUS, then rearm (STATUS bit 0, write 1 to clear).
  The bench also measures the latency itself: clock cycles from the cycle in which the firing sample is
  accepted to the first cycle with ``blank`` high, counted inclusively.
- ``ip_registers``: reset values of every register, writes and read-backs (with byte enables), read-only
  registers ignoring writes, START and rearm semantics and the counters on a short stream; the
  read-backs are written out for the test to compare with known answers.

Environment: ``BEAMLOOP_IP_IN`` (``.npz``: ``bus`` ("wb" or "axil"), and for the stream ``counts``
(concatenated, uint16), ``offsets`` (n_dwells + 1), ``rate_words``, ``threshold``) and
``BEAMLOOP_IP_OUT`` (``.npz`` with the results).
"""

from __future__ import annotations

import os

import numpy as np

PERIOD_NS = 10
"""Simulated clock period, ns."""

OFF = {"ID": 0x00, "CTRL": 0x04, "STATUS": 0x08, "THRESHOLD": 0x0C, "EXPECTED_RATE": 0x10, "TRIGGER_COUNT": 0x14,
       "SAMPLE_COUNT": 0x18, "LAST_TRIGGER_SAMPLE": 0x1C, "LATENCY": 0x20, "LAST_SCORE": 0x24, "MODEL_ID": 0x28,
       "CONFIG": 0x2C}
"""Register byte offsets (as :data:`beamloop.fpga.ip.REGISTERS`; repeated so that the bench imports no heavy module)."""


class WishboneMaster:
    """Single Wishbone B4 classic read and write cycles on ``<n>_ip_wb``."""

    def __init__(self, dut) -> None:
        self.dut = dut
        self.clk = dut.wb_clk_i

    def idle(self) -> None:
        """Drive the bus idle."""
        d = self.dut
        d.wb_cyc_i.value = 0
        d.wb_stb_i.value = 0
        d.wb_we_i.value = 0
        d.wb_adr_i.value = 0
        d.wb_dat_i.value = 0
        d.wb_sel_i.value = 0

    async def _cycle(self, addr: int, we: int, data: int, sel: int) -> int:
        from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

        d = self.dut
        await FallingEdge(self.clk)
        d.wb_adr_i.value = addr
        d.wb_we_i.value = we
        d.wb_dat_i.value = data & 0xFFFFFFFF
        d.wb_sel_i.value = sel
        d.wb_cyc_i.value = 1
        d.wb_stb_i.value = 1
        for _ in range(16):
            await RisingEdge(self.clk)
            await ReadOnly()
            if int(d.wb_ack_o.value):
                value = int(d.wb_dat_o.value)
                break
        else:
            raise AssertionError(f"no wb_ack_o for address 0x{addr:02X}")
        await FallingEdge(self.clk)
        self.idle()
        return value

    async def write(self, addr: int, data: int, sel: int = 0xF) -> None:
        """Write ``data`` to byte address ``addr`` with byte lanes ``sel``."""
        await self._cycle(addr, 1, data, sel)

    async def read(self, addr: int) -> int:
        """Read the register at byte address ``addr``."""
        return await self._cycle(addr, 0, 0, 0xF)


class AxiLiteMaster:
    """Single AXI4-Lite reads and writes on ``<n>_ip_axil`` (address and data channels one after the other, or
    data first with ``data_first``)."""

    def __init__(self, dut) -> None:
        self.dut = dut
        self.clk = dut.aclk

    def idle(self) -> None:
        """Drive every channel idle."""
        d = self.dut
        for s in ("awvalid", "wvalid", "bready", "arvalid", "rready"):
            getattr(d, f"s_axil_{s}").value = 0
        d.s_axil_awaddr.value = 0
        d.s_axil_araddr.value = 0
        d.s_axil_wdata.value = 0
        d.s_axil_wstrb.value = 0

    async def _transfer(self, valid, ready) -> None:
        """``valid`` was raised at a falling edge: wait for the rising edge that takes it, then lower it."""
        from cocotb.triggers import FallingEdge, RisingEdge

        for _ in range(32):
            r = int(ready.value)  # ready depends on registers only: its value now is the one the edge sees
            await RisingEdge(self.clk)
            await FallingEdge(self.clk)
            if r:
                valid.value = 0
                return
        raise AssertionError(f"no {ready._name} handshake")

    async def write(self, addr: int, data: int, sel: int = 0xF, data_first: bool = False) -> int:
        """Write ``data`` to byte address ``addr``; returns BRESP."""
        from cocotb.triggers import FallingEdge

        d = self.dut
        await FallingEdge(self.clk)
        d.s_axil_awaddr.value = addr
        d.s_axil_wdata.value = data & 0xFFFFFFFF
        d.s_axil_wstrb.value = sel
        first, second = (("wvalid", "wready"), ("awvalid", "awready")) if data_first else \
            (("awvalid", "awready"), ("wvalid", "wready"))
        getattr(d, f"s_axil_{first[0]}").value = 1
        await self._transfer(getattr(d, f"s_axil_{first[0]}"), getattr(d, f"s_axil_{first[1]}"))
        getattr(d, f"s_axil_{second[0]}").value = 1
        await self._transfer(getattr(d, f"s_axil_{second[0]}"), getattr(d, f"s_axil_{second[1]}"))
        return await self._response("b")

    async def read(self, addr: int) -> int:
        """Read the register at byte address ``addr``."""
        from cocotb.triggers import FallingEdge

        d = self.dut
        await FallingEdge(self.clk)
        d.s_axil_araddr.value = addr
        d.s_axil_arvalid.value = 1
        await self._transfer(d.s_axil_arvalid, d.s_axil_arready)
        return await self._response("r")

    async def _response(self, ch: str) -> int:
        """Take the B (``ch="b"``: returns BRESP) or R (returns RDATA; RRESP must be OKAY) response."""
        from cocotb.triggers import FallingEdge, RisingEdge

        d = self.dut
        valid = getattr(d, f"s_axil_{ch}valid")
        ready = getattr(d, f"s_axil_{ch}ready")
        ready.value = 1
        for _ in range(32):
            if int(valid.value):
                value = int(d.s_axil_bresp.value) if ch == "b" else int(d.s_axil_rdata.value)
                if ch == "r" and int(d.s_axil_rresp.value) != 0:
                    raise AssertionError("RRESP is not OKAY")
                await RisingEdge(self.clk)
                await FallingEdge(self.clk)
                ready.value = 0
                return value
            await RisingEdge(self.clk)
            await FallingEdge(self.clk)
        raise AssertionError(f"no {ch.upper()} response")


async def _setup(dut, bus: str):
    """Start the clock, reset the IP, and return (bus master, clock)."""
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import FallingEdge, RisingEdge

    if bus == "wb":
        m, clk, rst, active = WishboneMaster(dut), dut.wb_clk_i, dut.wb_rst_i, 1
    else:
        m, clk, rst, active = AxiLiteMaster(dut), dut.aclk, dut.aresetn, 0
    cocotb.start_soon(Clock(clk, PERIOD_NS, unit="ns").start())
    m.idle()
    dut.s_axis_tvalid.value = 0
    dut.s_axis_tdata.value = 0
    rst.value = active
    for _ in range(3):
        await RisingEdge(clk)
    await FallingEdge(clk)
    rst.value = 1 - active
    return m, clk


class _Monitor:
    """Records every ``score_valid`` output: score, decided, fire, blank, and the sim time (ns)."""

    def __init__(self, dut, clk) -> None:
        self.dut, self.clk = dut, clk
        self.rows: list[tuple[int, int, int, int, float]] = []

    async def run(self) -> None:
        from cocotb.triggers import ReadOnly, RisingEdge
        from cocotb.utils import get_sim_time

        d = self.dut
        while True:
            await RisingEdge(d.score_valid)
            await ReadOnly()
            self.rows.append((d.score.value.to_signed(), int(d.score_decided.value), int(d.score_fire.value),
                              int(d.blank.value), get_sim_time(unit="ns")))


async def _stream(dut, clk, samples: np.ndarray) -> list[float]:
    """Send ``samples`` through the AXI4-Stream input, each held until accepted; returns the sim time (ns)
    of each accepting clock edge."""
    from cocotb.triggers import FallingEdge, RisingEdge
    from cocotb.utils import get_sim_time

    times = []
    for v in samples:
        await FallingEdge(clk)
        while not int(dut.s_axis_tready.value):
            await RisingEdge(dut.s_axis_tready)
            await FallingEdge(clk)
        dut.s_axis_tdata.value = int(v)
        dut.s_axis_tvalid.value = 1
        await RisingEdge(clk)  # tready was high before this edge: the sample is taken here
        times.append(get_sim_time(unit="ns"))
        dut.s_axis_tvalid.value = 0
    return times


async def _wait_ready(dut, clk, limit: int = 100_000) -> None:
    from cocotb.triggers import FallingEdge, RisingEdge, with_timeout

    await FallingEdge(clk)
    if not int(dut.s_axis_tready.value):
        await with_timeout(RisingEdge(dut.s_axis_tready), limit * PERIOD_NS, "ns")


async def _stream_test(dut) -> None:
    import cocotb
    from cocotb.triggers import FallingEdge, RisingEdge
    from cocotb.utils import get_sim_time

    data = np.load(os.environ["BEAMLOOP_IP_IN"])
    bus = str(data["bus"])
    counts = data["counts"]
    offsets = data["offsets"]
    words = data["rate_words"]
    m, clk = await _setup(dut, bus)
    mon = _Monitor(dut, clk)
    cocotb.start_soon(mon.run())
    await m.write(OFF["THRESHOLD"], int(data["threshold"]))
    per = {k: [] for k in ("sample_count", "last_trigger_sample", "trigger_count", "latency", "status",
                           "latency_tb", "status_after_rearm")}
    for k in range(len(offsets) - 1):
        await m.write(OFF["EXPECTED_RATE"], int(words[k]))
        await m.write(OFF["CTRL"], 0x3)  # ENABLE | START
        await _wait_ready(dut, clk)
        before = len(mon.rows)
        seg = counts[offsets[k]:offsets[k + 1]]
        t_acc = await _stream(dut, clk, seg)
        for _ in range(100_000):  # the last scores leave the tail
            if len(mon.rows) - before >= len(seg):
                break
            await RisingEdge(clk)
        rows = mon.rows[before:]
        if len(rows) != len(seg):
            raise AssertionError(f"dwell {k}: {len(rows)} scores for {len(seg)} samples")
        fired = [i for i, r in enumerate(rows) if r[3]]
        lat = -1
        if fired:  # cycles from the accepting edge's cycle to the first cycle with blank high, inclusive
            i = fired[0]
            lat = int(round((rows[i][4] - t_acc[i]) / PERIOD_NS)) + 1
        per["latency_tb"].append(lat)
        for name in ("sample_count", "last_trigger_sample", "trigger_count", "latency", "status"):
            per[name].append(await m.read(OFF[name.upper()]))
        await m.write(OFF["STATUS"], 0x1)  # rearm
        per["status_after_rearm"].append(await m.read(OFF["STATUS"]))
    await FallingEdge(clk)
    rows = np.array([r[:4] for r in mon.rows], np.int64).reshape(-1, 4)
    np.savez(os.environ["BEAMLOOP_IP_OUT"], score=rows[:, 0], decided=rows[:, 1], fire=rows[:, 2], blank=rows[:, 3],
             cycles=int(get_sim_time(unit="ns") / PERIOD_NS), **{k: np.array(v, np.int64) for k, v in per.items()})


async def _register_test(dut) -> None:
    """Reset values, read-backs, byte enables, read-only registers, START and rearm, counters."""
    import cocotb
    from cocotb.triggers import FallingEdge, RisingEdge

    data = np.load(os.environ["BEAMLOOP_IP_IN"])
    bus = str(data["bus"])
    m, clk = await _setup(dut, bus)
    mon = _Monitor(dut, clk)
    cocotb.start_soon(mon.run())
    out: dict[str, int] = {}
    await _wait_ready(dut, clk)  # READY rises once the precompute has run on the cleared history
    for name, off in OFF.items():
        out[f"reset_{name}"] = await m.read(off)
    # read-write registers: full words and byte lanes
    for name, v in (("THRESHOLD", 0x89ABCDEF), ("EXPECTED_RATE", 0x00012345), ("TRIGGER_COUNT", 7)):
        await m.write(OFF[name], v)
        out[f"rw_{name}"] = await m.read(OFF[name])
    await m.write(OFF["THRESHOLD"], 0x11223344, sel=0b0101)  # lanes 0 and 2 only
    out["lanes_THRESHOLD"] = await m.read(OFF["THRESHOLD"])
    if bus == "axil":  # the data channel before the address channel
        await m.write(OFF["EXPECTED_RATE"], 0x00020000, data_first=True)
        out["data_first_EXPECTED_RATE"] = await m.read(OFF["EXPECTED_RATE"])
    # read-only registers ignore writes
    for name in ("ID", "SAMPLE_COUNT", "LAST_TRIGGER_SAMPLE", "LATENCY", "LAST_SCORE", "MODEL_ID", "CONFIG"):
        await m.write(OFF[name], 0x5A5A5A5A)
        out[f"ro_{name}"] = await m.read(OFF[name])
    await m.write(OFF["CTRL"], 0x1)
    out["ctrl_enable"] = await m.read(OFF["CTRL"])
    # a short stream: threshold at the lowest score fires on the first decided sample
    samples = data["samples"]
    await m.write(OFF["TRIGGER_COUNT"], 0)
    await m.write(OFF["THRESHOLD"], 0x80000000)  # most negative: every decided sample fires
    await m.write(OFF["EXPECTED_RATE"], int(data["rate_word"]))
    await m.write(OFF["CTRL"], 0x3)
    out["status_prefill"] = await m.read(OFF["STATUS"])
    await _wait_ready(dut, clk)
    out["status_after_prefill"] = await m.read(OFF["STATUS"])
    await _stream(dut, clk, samples[:5])
    for _ in range(200):
        await RisingEdge(clk)
    for name in ("STATUS", "SAMPLE_COUNT", "LAST_TRIGGER_SAMPLE", "TRIGGER_COUNT", "LATENCY", "LAST_SCORE"):
        out[f"fired_{name}"] = await m.read(OFF[name])
    await m.write(OFF["STATUS"], 0x6)  # bits 1, 2 are read-only and bit 0 is not written: no rearm
    out["status_no_rearm"] = await m.read(OFF["STATUS"])
    await m.write(OFF["STATUS"], 0x1)  # rearm: the next decided sample fires again
    out["status_rearmed"] = await m.read(OFF["STATUS"])
    await _stream(dut, clk, samples[5:8])
    for _ in range(200):
        await RisingEdge(clk)
    for name in ("STATUS", "SAMPLE_COUNT", "LAST_TRIGGER_SAMPLE", "TRIGGER_COUNT"):
        out[f"refired_{name}"] = await m.read(OFF[name])
    await m.write(OFF["CTRL"], 0x0)  # disabled: scores go on, the latch is not set
    await m.write(OFF["STATUS"], 0x1)
    await _stream(dut, clk, samples[8:10])
    for _ in range(200):
        await RisingEdge(clk)
    for name in ("STATUS", "SAMPLE_COUNT", "TRIGGER_COUNT"):
        out[f"disabled_{name}"] = await m.read(OFF[name])
    # START without a rate: the next history - 1 samples are not decided
    await m.write(OFF["EXPECTED_RATE"], 0)
    await m.write(OFF["CTRL"], 0x3)
    await _wait_ready(dut, clk)
    for name in ("STATUS", "SAMPLE_COUNT", "LAST_TRIGGER_SAMPLE"):
        out[f"restart_{name}"] = await m.read(OFF[name])
    await _stream(dut, clk, samples[10:14])
    for _ in range(200):
        await RisingEdge(clk)
    out["nostart_STATUS"] = await m.read(OFF["STATUS"])
    await FallingEdge(clk)
    rows = np.array([r[:4] for r in mon.rows], np.int64).reshape(-1, 4)
    np.savez(os.environ["BEAMLOOP_IP_OUT"], names=np.array(list(out)), values=np.array(list(out.values()), np.int64),
             score=rows[:, 0], decided=rows[:, 1], fire=rows[:, 2], blank=rows[:, 3])


try:  # cocotb is importable only where the fpga extra is installed; the benches are collected inside the simulator
    import cocotb as _cocotb

    @_cocotb.test()
    async def ip_stream(dut):
        """Dwells through the IP, every score recorded (see the module docstring)."""
        await _stream_test(dut)

    @_cocotb.test()
    async def ip_registers(dut):
        """Register map behaviour (see the module docstring)."""
        await _register_test(dut)
except ImportError:  # pragma: no cover - plain import without cocotb
    pass
