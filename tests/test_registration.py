"""Frame-to-frame registration (edge/analysis/registration.py) against scikit-image and known shifts."""

import numpy as np
import pytest
from scipy.ndimage import shift as nd_shift
from scipy.signal.windows import tukey

import beamloop
from beamloop.edge.analysis.registration import Registrar


def pair(n, d, seed, dose=1e5):
    rng = np.random.default_rng(seed)
    base = beamloop.simulated_frame(shape=(n + 32, n + 32), seed=seed, dose_e_per_A2=1e6).counts.astype(np.float64)
    moved = nd_shift(base, (d[1], d[0]), order=3, mode="nearest")
    win = np.outer(tukey(n, 0.3), tukey(n, 0.3))
    out = []
    for img in (base, moved):
        img = rng.poisson(np.clip(img[16:16 + n, 16:16 + n], 0, None) * dose / 1e6).astype(np.float64)
        out.append(((img - img.mean()) * win).astype(np.float32))
    return out


def test_all_frequencies_give_scikit_images_shift():
    from skimage.registration import phase_cross_correlation

    rng = np.random.default_rng(5)
    for k in range(6):
        d = rng.uniform(-3, 3, 2)
        a, b = pair(128, d, k)
        r = Registrar((128, 128), upsample=20, band=0.5)
        assert r.push(a) is None
        shift, error = r.push(b)
        s, _, _ = phase_cross_correlation(a, b, upsample_factor=20, normalization=None)
        assert np.allclose(shift, -np.asarray(s)[::-1], atol=1e-9)
        assert 0.0 <= error < 1.0


@pytest.mark.parametrize("n", [128, 256])
def test_known_shifts_at_1e5_as_well_as_all_frequencies(n):
    # shot noise at 1e5 e-/A^2 and the 1/20 px grid (up to 0.035 px by itself): the band-limited refinement is
    # within a tenth of a pixel everywhere and on average no worse than summing every frequency
    rng = np.random.default_rng(n)
    err = {0.25: [], 0.5: []}
    for k in range(5):
        d = rng.uniform(-4, 4, 2)
        a, b = pair(n, d, 10 + k)
        for band in err:
            r = Registrar((n, n), upsample=20, band=band)
            r.push(a)
            shift, _ = r.push(b)
            err[band].append(float(np.hypot(*(shift - d))))
    assert max(err[0.25]) <= 0.1
    assert np.mean(err[0.25]) <= np.mean(err[0.5]) + 0.005


def test_reset_shape_and_option_errors():
    r = Registrar((16, 16))
    a = np.zeros((16, 16), np.float32)
    assert r.push(a) is None and r.push(a) is not None
    r.reset()
    assert r.push(a) is None
    with pytest.raises(ValueError, match="differs"):
        r.push(np.zeros((16, 17), np.float32))
    for kw in ({"shape": (4, 16)}, {"shape": (16, 16), "upsample": 0}, {"shape": (16, 16), "band": 0.6}):
        with pytest.raises(ValueError):
            Registrar(**kw)
