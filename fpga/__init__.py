"""Trigger models compiled to FPGA logic (issue 6).

QONNX -> :mod:`fpga.qonnx_trace` (da4ml) -> :mod:`fpga.rtl` (pipelined Verilog in our trigger wrapper) ->
:mod:`fpga.sim` (cocotb + Icarus, bit-exact against qonnx) -> :mod:`fpga.synth` (yosys, nextpnr-ecp5,
ecppack); in parallel :mod:`fpga.hls` (hls4ml C simulation; HLS synthesis where Vitis exists).
:mod:`fpga.flow` runs them, :mod:`fpga.report` writes the report, :mod:`fpga.cli` is ``beamloop fpga``.
Heavy packages (hls4ml, da4ml, cocotb, qonnx) are imported inside functions only.
"""
