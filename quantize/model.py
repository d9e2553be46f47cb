"""The trigger networks: a float MLP and its Brevitas quantization-aware twin (imports torch and brevitas).

Both take the integer feature vector of :func:`beamloop.edge.trigger.model.window_features` and return one logit
("the atom under the beam is gone"). The quantized network is built so that its QONNX export is exactly
what :mod:`beamloop.edge.trigger.model` computes with integers (the QONNX ``Quant`` operator of
A. Pappalardo et al., "QONNX: Representing arbitrary-precision quantized neural networks",
arXiv:2206.07527 (2022), with Brevitas' quantiser classes, https://github.com/Xilinx/brevitas):

- input quantiser: unsigned, ``input_bits`` wide, constant scale 1 (``max_val = 2**input_bits - 1``), so
  integer detector counts lie on its grid and pass unchanged (saturating above ``2**input_bits - 1``);
- weights: signed, narrow range, ``weight_bits`` wide, one power-of-two scale per tensor
  (``Int8WeightPerTensorFixedPoint`` with the bit width overridden);
- biases: signed, ``bias_bits`` wide, scale = input scale x weight scale (``Int16Bias`` with the width
  overridden), so the accumulator is an integer;
- hidden activations: ReLU then an unsigned ``act_bits`` quantiser with a learned power-of-two scale and
  FLOOR rounding (``float_to_int_impl_type = FLOOR``), which hardware implements as a right shift;
- output: the last layer's accumulator, unquantized (its scale is a power of two, so it is exact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Bits:
    """Bit widths of the quantized network (the input width is :attr:`FeatureSpec.input_bits`).

    Attributes
    ----------
    weight, act, bias : int
        Weight, hidden-activation and bias widths, bits.
    """

    weight: int = 6
    act: int = 8
    bias: int = 16

    def __post_init__(self) -> None:
        if not (2 <= self.weight <= 16 and 2 <= self.act <= 16 and 4 <= self.bias <= 32):
            raise ValueError(f"bit widths out of range: {self}")

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def float_mlp(n_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """The float network: Linear-ReLU per hidden width, then Linear to one logit."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def quant_mlp(n_in: int, hidden: tuple[int, ...], input_bits: int, bits: Bits) -> nn.Sequential:
    """The Brevitas network with the quantisers described in the module docstring.

    Returns
    -------
    nn.Sequential
        ``QuantIdentity``, then ``QuantLinear``-``QuantReLU`` per hidden width, then ``QuantLinear``.
    """
    from brevitas.inject.enum import FloatToIntImplType, ScalingImplType
    from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU
    from brevitas.quant import Int8WeightPerTensorFixedPoint, Int16Bias, Uint8ActPerTensorFixedPoint

    class InputQuant(Uint8ActPerTensorFixedPoint):
        """Unsigned integers, scale fixed at 1."""

        scaling_impl_type = ScalingImplType.CONST
        max_val = float(2 ** input_bits - 1)
        bit_width = input_bits

    class ActQuant(Uint8ActPerTensorFixedPoint):
        """Unsigned activations, learned power-of-two scale, FLOOR rounding."""

        float_to_int_impl_type = FloatToIntImplType.FLOOR
        bit_width = bits.act

    class WeightQuant(Int8WeightPerTensorFixedPoint):
        """Signed narrow-range weights, one power-of-two scale per tensor, ``bits.weight`` wide."""

        bit_width = bits.weight

    class BiasQuant(Int16Bias):
        """Signed biases on the accumulator's grid (input scale x weight scale), ``bits.bias`` wide."""

        bit_width = bits.bias

    layers: list[nn.Module] = [QuantIdentity(act_quant=InputQuant, return_quant_tensor=True)]
    width = n_in
    for h in hidden:
        layers += [QuantLinear(width, h, bias=True, weight_quant=WeightQuant, bias_quant=BiasQuant,
                               return_quant_tensor=True),
                   QuantReLU(act_quant=ActQuant, return_quant_tensor=True)]
        width = h
    layers.append(QuantLinear(width, 1, bias=True, weight_quant=WeightQuant, bias_quant=BiasQuant,
                              return_quant_tensor=False))
    return nn.Sequential(*layers)


def copy_float_weights(src: nn.Sequential, dst: nn.Sequential) -> None:
    """Initialise the quantized network's linear layers from the float network's (same widths)."""
    fl = [m for m in src if isinstance(m, nn.Linear)]
    ql = [m for m in dst if isinstance(m, nn.Linear)]  # brevitas QuantLinear subclasses nn.Linear
    if len(fl) != len(ql):
        raise ValueError(f"float network has {len(fl)} linear layers, quantized {len(ql)}")
    with torch.no_grad():
        for a, b in zip(fl, ql):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
