"""Trigger models compiled to FPGA logic.

QONNX -> :mod:`beamloop.fpga.qonnx_trace` (da4ml) -> :mod:`beamloop.fpga.rtl` (pipelined Verilog in our trigger
wrapper) -> :mod:`beamloop.fpga.sim` (cocotb + Icarus, bit-exact against qonnx) -> :mod:`beamloop.fpga.synth` (yosys,
nextpnr-ecp5, ecppack); in parallel :mod:`beamloop.fpga.hls` (hls4ml C simulation; HLS synthesis where Vitis
exists). :mod:`beamloop.fpga.flow` runs them, :mod:`beamloop.fpga.report` writes the report,
:mod:`beamloop.fpga.cli` is ``beamloop fpga``. Heavy packages (hls4ml, da4ml, cocotb, qonnx) are imported inside
functions only.
"""

DEFAULT_LATENCY_CUTOFF = 1.0
"""da4ml combinational depth per pipeline stage (adder delays) used unless told otherwise. Measured for the
shipped ejection trigger on LFE5U-85F (bench/results/fpga_ejection.md): 1.0 gives 20 stages, 110.3 MHz and
21 cycles = 190.4 ns, which meets both goals (fmax >= 100 MHz, latency <= 200 ns); CHANGELOG.md records
the other settings measured."""
