"""Trigger models compiled to FPGA logic.

The trigger IP: :mod:`beamloop.fpga.ip` writes the whole ejection trigger (raw ADF samples in through AXI4-Stream,
history, running block sums, the integer network as two da4ml pipelines, threshold, latching blank, a Wishbone
B4 classic or AXI4-Lite register block); :mod:`beamloop.fpga.ip_sim` (benches in :mod:`beamloop.fpga.cocotb_ip`)
simulates it in cocotb + Icarus against the integer runtime on dwells; :mod:`beamloop.fpga.synth` runs yosys,
nextpnr-ecp5 and ecppack; :mod:`beamloop.fpga.hls` C-simulates the network with hls4ml (HLS synthesis where
Vitis exists). :mod:`beamloop.fpga.flow` runs them, :mod:`beamloop.fpga.report` writes the report,
:mod:`beamloop.fpga.cli` is ``beamloop fpga``. The earlier model-only flow (QONNX -> :mod:`beamloop.fpga.qonnx_trace`
(da4ml) -> :mod:`beamloop.fpga.rtl`, the network on a ready feature vector -> :mod:`beamloop.fpga.sim` against
qonnx) is kept. Heavy packages (hls4ml, da4ml, cocotb, qonnx) are imported inside functions only.
"""

DEFAULT_LATENCY_CUTOFF = 1.0
"""da4ml combinational depth per pipeline stage (adder delays) used unless told otherwise. Measured for the
shipped ejection trigger on LFE5U-85F (bench/results/fpga_ejection.md): 1.0 gives 20 stages, 110.3 MHz and
21 cycles = 190.4 ns, which meets both goals (fmax >= 100 MHz, latency <= 200 ns); CHANGELOG.md records
the other settings measured."""
