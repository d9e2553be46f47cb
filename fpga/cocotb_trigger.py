"""The cocotb test bench that :func:`beamloop.fpga.sim.simulate` runs inside Icarus Verilog (not a pytest module).

It drives the trigger wrapper (:mod:`beamloop.fpga.rtl`) cycle by cycle: inputs change on the falling clock
edge, outputs are read in the read-only phase after each rising edge. First ``spaced`` samples are presented
one at a time (the pipeline empty) to measure the latency in cycles, counted from the cycle in which
``in_valid`` is high to the cycle in which ``out_valid`` is high, both by the test bench and by the
wrapper's ``latency_cycles`` register; then all samples are streamed back to back (one per cycle,
initiation interval 1). Every ``out_valid`` cycle's score, trigger and blank are recorded.

Environment: ``BEAMLOOP_SIM_IN`` (``.npz`` with ``x`` (n, n_inputs) integer words, ``input_bits``,
``spaced``, ``timeout``) and ``BEAMLOOP_SIM_OUT`` (``.npz`` written with ``score``, ``trigger``, ``blank``,
``latency_tb``, ``latency_hw`` and ``cycles``).
"""

from __future__ import annotations

import os

import numpy as np


async def _run(dut):
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

    from beamloop.fpga.rtl import pack_inputs

    data = np.load(os.environ["BEAMLOOP_SIM_IN"])
    x = data["x"]
    bits = int(data["input_bits"])
    spaced = int(data["spaced"])
    timeout = int(data["timeout"])
    words = pack_inputs(x, bits)
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.in_valid.value = 0
    dut.rearm.value = 0
    dut.in_features.value = 0
    for _ in range(3):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0

    scores, triggers, blanks, lat_tb, lat_hw = [], [], [], [], []
    cycle = 0

    async def step(valid: int, word: int | None):
        """Drive one cycle (inputs already applied at the falling edge), then read outputs."""
        nonlocal cycle
        await RisingEdge(dut.clk)
        await ReadOnly()
        cycle += 1
        if int(dut.out_valid.value):
            scores.append(dut.score.value.to_signed())
            triggers.append(int(dut.trigger.value))
            blanks.append(int(dut.blank.value))
            return True
        return False

    async def drive(valid: int, word: int | None):
        await FallingEdge(dut.clk)
        dut.in_valid.value = valid
        if word is not None:
            dut.in_features.value = word

    # 1. spaced samples: latency
    for k in range(min(spaced, len(words))):
        await drive(1, words[k])
        start = cycle + 1  # the cycle in which in_valid is high
        got = await step(1, words[k])
        await drive(0, None)
        while not got:
            if cycle - start > timeout:
                raise AssertionError(f"no out_valid within {timeout} cycles")
            got = await step(0, None)
        lat_tb.append(cycle - start + 1)
        lat_hw.append(int(dut.latency_cycles.value))
    # 2. back-to-back stream of every sample
    n_spaced_out = len(scores)
    for w in words:
        await drive(1, w)
        await step(1, w)
    await drive(0, None)
    idle = 0
    while len(scores) < n_spaced_out + len(words):
        await step(0, None)
        idle += 1
        if idle > timeout:
            raise AssertionError(f"stream: {len(scores) - n_spaced_out} of {len(words)} outputs before timeout")
    np.savez(os.environ["BEAMLOOP_SIM_OUT"], score=np.array(scores, np.int64), trigger=np.array(triggers, np.int8),
             blank=np.array(blanks, np.int8), latency_tb=np.array(lat_tb, np.int64),
             latency_hw=np.array(lat_hw, np.int64), spaced=n_spaced_out, cycles=cycle)


try:  # cocotb is importable only where the fpga extra is installed; the bench is collected inside the simulator
    import cocotb as _cocotb

    @_cocotb.test()
    async def trigger_stream(dut):
        """Latency and bit-exactness run (see the module docstring)."""
        await _run(dut)
except ImportError:  # pragma: no cover - plain import without cocotb
    pass
