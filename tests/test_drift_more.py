"""Issue 17, the rest: scan-coil hysteresis, lattice-aware column matching in ``register``, estimator updates
from re-centring scans and re-centring during long dwells.

All on hand-moved clocks (the simulator's drift and the service's prediction read the clock they are given).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from beamloop.edge.sim.drift import hysteresis_offset
from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedBackend
from tests.test_drift import HandClock, acquire, scan_of


# --- (a) scan-coil hysteresis -----------------------------------------------------------------------------
def test_hysteresis_offset_is_h_against_the_last_move():
    h = 0.2
    assert np.array_equal(hysteresis_offset(None, np.array([1.0, 1.0]), h, np.zeros(2)), [0.0, 0.0])
    off = hysteresis_offset(np.array([0.0, 0.0]), np.array([3.0, 4.0]), h, np.zeros(2))
    assert np.allclose(off, [-0.12, -0.16])  # 0.2 A back along (3, 4) / 5
    assert np.array_equal(hysteresis_offset(np.array([3.0, 4.0]), np.array([3.0, 4.0]), h, off), off)
    with pytest.raises(ValueError, match="hysteresis"):
        hysteresis_offset(None, np.zeros(2), -1.0, np.zeros(2))
    with pytest.raises(ValueError, match="coil_hysteresis_A"):
        MicroscopeConfig(coil_hysteresis_A=math.nan)


@pytest.mark.parametrize("h", [0.0, 0.25])
def test_probe_lands_short_by_the_hysteresis_along_the_move(h):
    """No drift, instantaneous coils: parking on the same position from the left and from below lands ``h``
    A short along each approach (0.5 A apart for h = 0.25 between the two approaches, bit-exact at 0)."""
    clock = HandClock()
    b = SimulatedBackend(MicroscopeConfig(seed=2, specimen_size_A=80.0, distortion_scale=0.0, scan_damage=False,
                                          coil_hysteresis_A=h, coil_settle_us=1e-6 if h == 0 else 0.0), clock)
    scan = scan_of(0, 96)
    acquire(b, scan)
    x, y = scan.specimen_of_fraction(0.5, 0.5)

    def land(fx, fy):
        b.park(fx, fy, 0)
        clock.t += 0.01
        px, py = b.probe_rest_A(np.array([clock.t]))
        return np.array([px[0], py[0]])

    land(0.3, 0.5)
    from_left = land(0.5, 0.5)  # moved +x
    land(0.5, 0.3)
    land(0.5, 0.3)  # a move of zero length keeps the error of the move before
    from_below = land(0.5, 0.5)  # moved along +y in fractions: the lab direction of +fy
    ux = np.subtract(scan.specimen_of_fraction(0.6, 0.5), scan.specimen_of_fraction(0.5, 0.5))
    uy = np.subtract(scan.specimen_of_fraction(0.5, 0.6), scan.specimen_of_fraction(0.5, 0.5))
    ux, uy = ux / np.hypot(*ux), uy / np.hypot(*uy)
    assert np.allclose(from_left, np.array([x, y]) - h * ux, atol=1e-9)
    assert np.allclose(from_below, np.array([x, y]) - h * uy, atol=1e-9)
