"""The quantized ejection trigger: a tiny integer MLP on the parked-probe ADF samples (numba, no torch).

The model was trained by ``beamloop quantize train`` (Brevitas quantization-aware training, :mod:`quantize`)
and ships in ``edge/models/trigger/`` as a QONNX graph (``<name>.onnx``, what the FPGA flow compiles), a
plain-ONNX twin (``<name>_plain.onnx``) and the same network as integers (``<name>_int.npz``), which this
module runs. Its output is bit-exact with the QONNX graph executed by qonnx (tests/test_trigger_model.py).

Input features (:class:`FeatureSpec`), all integers on the input quantiser's grid (scale 1), for the
sample ``t`` being decided on:

- ``window`` samples ``x[t-window+1 .. t]``, oldest first (detector counts per sample);
- ``blocks`` context sums of ``block`` samples each, covering the ``blocks * block`` samples just before
  the window, oldest first, each right-shifted by ``shift`` bits (``floor(sum / 2**shift)``);

each clipped to ``[0, 2**input_bits - 1]`` as the input quantiser saturates. The context lets the model
compare the last samples with the recent level instead of an absolute rate, so slow beam-current and
drift changes do not look like an ejection. In logic the context is a shift register and ``blocks``
accumulators.

Arithmetic per layer ``l`` (power-of-two scales, see ../shared/notes/fpga-toolflow.md):
``acc = W_l @ a + b_l`` (integers; the accumulator's scale is ``s_a * s_w``), then for hidden layers
ReLU and the activation quantiser with FLOOR rounding: ``a' = min(max(acc, 0) >> -e_l, 2**bits - 1)``
(``acc << e_l`` when ``e_l >= 0``), with ``2**e_l = s_a * s_w / s_out``. The last layer's accumulator
is the score (a logit in units of ``output_scale``); the trigger fires when ``score >= threshold``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numba
import numpy as np

MODEL_DIR = Path(str(resources.files("edge") / "models" / "trigger"))
"""Folder of the shipped trigger models (``manifest.json`` lists them)."""


@dataclass(frozen=True)
class FeatureSpec:
    """How the model's input vector is made from the sample stream (see the module docstring).

    Attributes
    ----------
    window : int
        Most recent samples fed one by one.
    blocks : int
        Context sums before the window (0: none).
    block : int
        Samples per context sum.
    shift : int
        Right shift applied to each context sum, bits.
    input_bits : int
        Unsigned input width; features saturate at ``2**input_bits - 1``.
    """

    window: int = 32
    blocks: int = 4
    block: int = 32
    shift: int = 2
    input_bits: int = 8

    def __post_init__(self) -> None:
        if self.window < 1 or self.blocks < 0 or self.block < 1 or self.shift < 0 or not 1 <= self.input_bits <= 24:
            raise ValueError(f"invalid feature spec {self}")

    @property
    def history(self) -> int:
        """Samples needed for one decision: ``window + blocks * block``."""
        return self.window + self.blocks * self.block

    @property
    def n_features(self) -> int:
        """Length of the input vector: ``window + blocks``."""
        return self.window + self.blocks

    @property
    def input_max(self) -> int:
        """Largest input value, ``2**input_bits - 1``."""
        return (1 << self.input_bits) - 1

    def as_dict(self) -> dict:
        """The spec as a JSON-ready dict."""
        return {"window": self.window, "blocks": self.blocks, "block": self.block, "shift": self.shift,
                "input_bits": self.input_bits}


def window_features(counts: np.ndarray, spec: FeatureSpec, ends: np.ndarray | None = None) -> np.ndarray:
    """Input vectors for decisions at sample indices ``ends`` of one stream (vectorised; for training).

    Parameters
    ----------
    counts : ndarray, shape (n,), integer
        Detector counts per sample.
    spec : FeatureSpec
    ends : ndarray of int, optional
        Sample indices decided on (each ``>= spec.history - 1``); default every one from
        ``spec.history - 1`` to ``n - 1``.

    Returns
    -------
    ndarray, shape (len(ends), spec.n_features), int32

    Raises
    ------
    ValueError
        ``counts`` not 1-D, negative, or an end index without enough history or past the stream.
    """
    x = np.asarray(counts)
    if x.ndim != 1 or x.dtype.kind not in "iu":
        raise ValueError(f"counts must be a 1-D integer array, got shape {x.shape} dtype {x.dtype}")
    if x.size and x.min() < 0:
        raise ValueError("counts must be non-negative")
    h = spec.history
    if ends is None:
        ends = np.arange(h - 1, len(x))
    ends = np.asarray(ends, np.int64)
    if ends.size and (ends.min() < h - 1 or ends.max() >= len(x)):
        raise ValueError(f"decision indices need {h - 1} samples of history and must lie inside the stream")
    out = np.empty((len(ends), spec.n_features), np.int32)
    offs = np.arange(-spec.window + 1, 1)
    out[:, :spec.window] = np.minimum(x[ends[:, None] + offs], spec.input_max)
    if spec.blocks:
        cs = np.concatenate([[0], np.cumsum(x, dtype=np.int64)])
        first = ends - h + 1
        for j in range(spec.blocks):
            s = cs[first + (j + 1) * spec.block] - cs[first + j * spec.block]
            out[:, spec.window + j] = np.minimum(s >> spec.shift, spec.input_max)
    return out


@dataclass
class IntegerMLP:
    """An integer MLP as the runtime executes it (read from ``<name>_int.npz``).

    Attributes
    ----------
    weights : list of ndarray, shape (out, in), int64
    biases : list of ndarray, shape (out,), int64
    shifts : ndarray, shape (layers - 1,), int64
        Requantisation exponent ``e_l`` of each hidden layer (``a' = acc * 2**e_l``, floored).
    act_max : ndarray, shape (layers - 1,), int64
        Largest activation of each hidden layer, ``2**bits - 1``.
    output_scale : float
        Scale of the last accumulator (logit = score * output_scale).
    input_max : int
        The input quantiser's largest value, ``2**input_bits - 1``: inputs are clipped to
        ``[0, input_max]`` first, as the graph's input ``Quant`` node does.
    """

    weights: list
    biases: list
    shifts: np.ndarray
    act_max: np.ndarray
    output_scale: float
    input_max: int

    def __post_init__(self) -> None:
        if not self.weights or len(self.weights) != len(self.biases) or len(self.shifts) != len(self.weights) - 1:
            raise ValueError("integer MLP: need as many biases as weight matrices and one shift per hidden layer")
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or b.shape != (w.shape[0],) or (k and w.shape[1] != self.weights[k - 1].shape[0]):
                raise ValueError(f"integer MLP: layer {k} has weights {w.shape} and bias {b.shape} that do not chain")
        if self.weights[-1].shape[0] != 1:
            raise ValueError("integer MLP: the last layer must have one output (the score)")
        dims = [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]
        self.dims = np.array(dims, np.int64)
        self.w_flat = np.concatenate([w.astype(np.int64).ravel() for w in self.weights])
        self.b_flat = np.concatenate([b.astype(np.int64) for b in self.biases])
        self.shifts = np.asarray(self.shifts, np.int64)
        self.act_max = np.asarray(self.act_max, np.int64)

    @classmethod
    def load(cls, path: Path) -> "IntegerMLP":
        """Read ``<name>_int.npz`` (keys ``layers w0.. b0.. shifts act_max output_scale input_max``); raises
        ``OSError`` / ``ValueError`` / ``KeyError`` for a missing or malformed file."""
        with np.load(path, allow_pickle=False) as z:
            n = int(z["layers"])
            return cls([z[f"w{k}"].astype(np.int64) for k in range(n)], [z[f"b{k}"].astype(np.int64) for k in range(n)],
                       z["shifts"], z["act_max"], float(z["output_scale"]), int(z["input_max"]))

    def save(self, path: Path) -> None:
        """Write the ``.npz`` that :meth:`load` reads."""
        arrays = {f"w{k}": w.astype(np.int32) for k, w in enumerate(self.weights)}
        arrays.update({f"b{k}": b.astype(np.int32) for k, b in enumerate(self.biases)})
        np.savez(path, layers=len(self.weights), shifts=self.shifts, act_max=self.act_max,
                 output_scale=np.float64(self.output_scale), input_max=np.int64(self.input_max), **arrays)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Integer scores of input vectors.

        Parameters
        ----------
        features : ndarray, shape (n, n_in), integer, on the input grid

        Returns
        -------
        ndarray, shape (n,), int64

        Raises
        ------
        ValueError
            Wrong number of inputs per vector.
        """
        f = np.ascontiguousarray(features, np.int64)
        if f.ndim != 2 or f.shape[1] != self.dims[0]:
            raise ValueError(f"expected input vectors of length {self.dims[0]}, got shape {f.shape}")
        out = np.empty(len(f), np.int64)
        _mlp_batch(f, self.w_flat, self.b_flat, self.dims, self.shifts, self.act_max, self.input_max, out)
        return out


@numba.njit(cache=True, nogil=True)
def _mlp_forward(feat, w, b, dims, shifts, act_max, in_max, a, z):
    """One integer forward pass of ``feat`` (int64, dims[0]), inputs clipped to ``[0, in_max]``; ``a``, ``z``
    are work buffers."""
    n_layers = dims.shape[0] - 1
    for i in range(dims[0]):
        v = feat[i]
        a[i] = 0 if v < 0 else (in_max if v > in_max else v)
    wo = 0
    bo = 0
    for l in range(n_layers):
        n_in = dims[l]
        n_out = dims[l + 1]
        for o in range(n_out):
            acc = b[bo + o]
            row = wo + o * n_in
            for i in range(n_in):
                acc += w[row + i] * a[i]
            z[o] = acc
        wo += n_in * n_out
        bo += n_out
        if l == n_layers - 1:
            return z[0]
        e = shifts[l]
        m = act_max[l]
        for o in range(n_out):
            v = z[o]
            if v < 0:
                v = 0
            if e >= 0:
                v = v << e
            else:
                v = v >> (-e)
            if v > m:
                v = m
            a[o] = v
    return 0


@numba.njit(cache=True, nogil=True)
def _mlp_batch(f, w, b, dims, shifts, act_max, in_max, out):
    width = 0
    for d in dims:
        width = max(width, d)
    a = np.empty(width, np.int64)
    z = np.empty(width, np.int64)
    for k in range(f.shape[0]):
        out[k] = _mlp_forward(f[k], w, b, dims, shifts, act_max, in_max, a, z)


@numba.njit(cache=True, nogil=True)
def _stream(x, ring, state, window, blocks, block, shift, in_max, w, b, dims, shifts, act_max, feat, a, z,
            threshold, scores, stop):
    """Push counts ``x`` through the history and decide on every sample once ``h`` samples are in.

    ``ring`` (2h) holds every sample twice (at ``p`` and ``p + h``) so that the last ``h`` samples are the
    contiguous slice ``ring[p + 1 : p + 1 + h]`` after a write at ``p``, oldest first; ``state = [p_next,
    filled]``. ``scores`` (len(x) or 0) receives every score (``-2**62`` before the history is full).
    Returns the index of the first sample whose score reaches ``threshold`` (and stops there if ``stop``),
    or -1.
    """
    h = ring.shape[0] // 2
    pos = state[0]
    filled = state[1]
    record = scores.shape[0] == x.shape[0]
    first = -1
    for k in range(x.shape[0]):
        v = x[k]
        ring[pos] = v
        ring[pos + h] = v
        o = pos + 1  # oldest sample of the history
        pos = 0 if pos == h - 1 else pos + 1
        if filled < h:
            filled += 1
            if filled < h:
                if record:
                    scores[k] = -(1 << 62)
                continue
        base = o + h - window
        for i in range(window):
            feat[i] = ring[base + i]
        for j in range(blocks):
            t = 0
            start = o + j * block
            for i in range(block):
                t += ring[start + i]
            feat[window + j] = t >> shift
        sc = _mlp_forward(feat, w, b, dims, shifts, act_max, in_max, a, z)
        if record:
            scores[k] = sc
        if sc >= threshold and first < 0:
            first = k
            if stop:
                break
    state[0] = pos
    state[1] = filled
    return first


def load_manifest(model_dir: Path | None = None) -> dict:
    """The shipped models' ``manifest.json`` as a dict.

    Raises
    ------
    FileNotFoundError
        No manifest in ``model_dir`` (default :data:`MODEL_DIR`).
    """
    path = Path(model_dir or MODEL_DIR) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no trigger model manifest at {path}; train one with `beamloop quantize train`")
    return json.loads(path.read_text())


class ModelTrigger:
    """The quantized ejection trigger with the interface of :mod:`edge.trigger`'s triggers.

    Parameters
    ----------
    model : str
        Entry of ``manifest.json`` (default ``"ejection"``).
    threshold : int, optional
        Alarm threshold on the integer score; default the manifest's operating point.
    model_dir : path, optional
        Folder holding ``manifest.json`` and the model files (default :data:`MODEL_DIR`).

    Raises
    ------
    FileNotFoundError
        Manifest or model file missing.
    KeyError
        ``model`` not in the manifest.
    ValueError
        Malformed model file, or a feature spec that does not fit the network.
    """

    name = "model"

    def __init__(self, model: str = "ejection", threshold: int | None = None, model_dir: Path | None = None) -> None:
        d = Path(model_dir or MODEL_DIR)
        entry = load_manifest(d)["models"][model]
        self.model_name = model
        self.spec = FeatureSpec(**entry["features"])
        self.mlp = IntegerMLP.load(d / entry["files"]["integer"])
        if self.mlp.dims[0] != self.spec.n_features or self.mlp.input_max != self.spec.input_max:
            raise ValueError(f"model {model}: network takes {self.mlp.dims[0]} inputs up to {self.mlp.input_max}, "
                             f"features give {self.spec.n_features} up to {self.spec.input_max}")
        self.threshold = int(entry["threshold"]["score"] if threshold is None else threshold)
        self.sample_time_us = float(entry.get("sample_time_us", 10.0))
        width = int(self.mlp.dims.max())
        self._ring = np.zeros(2 * self.spec.history, np.int64)
        self._state = np.zeros(2, np.int64)
        self._feat = np.zeros(self.spec.n_features, np.int64)
        self._a = np.zeros(width, np.int64)
        self._z = np.zeros(width, np.int64)
        self._no_scores = np.zeros(0, np.int64)
        self.start()

    @property
    def triggered(self) -> bool:
        """Whether an alarm has been raised in this dwell."""
        return self.trigger_sample >= 0

    def start(self, expected_rate: float | None = None) -> None:
        """Begin a new dwell.

        Without ``expected_rate`` the first decision comes once ``spec.history`` samples have arrived (as
        the classical triggers wait for their baseline). With it (counts per sample), the history is
        pre-filled with integer counts whose running sum follows ``expected_rate`` so that decisions start
        at the first sample. :attr:`lam0` is the expected rate, or the mean of the first
        ``spec.history`` samples.

        Raises ``ValueError`` for a non-finite or non-positive rate.
        """
        if expected_rate is not None and not (math.isfinite(expected_rate) and expected_rate > 0):
            raise ValueError(f"expected rate must be a positive number of counts per sample, got {expected_rate}")
        self.samples_seen = 0
        self.trigger_sample = -1
        self.lam0 = math.nan
        self._base_sum = 0.0
        self._state[:] = 0
        self._ring[:] = 0
        if expected_rate is not None:
            h = self.spec.history
            k = np.arange(h + 1)
            seq = np.diff(np.floor(k * float(expected_rate))).astype(np.int64)
            self._ring[:h] = seq
            self._ring[h:] = seq
            self._state[1] = h
            self.lam0 = float(expected_rate)

    def update(self, samples: np.ndarray) -> int:
        """Feed a block of counts; return the index within it of the alarm, or -1.

        Parameters
        ----------
        samples : ndarray, shape (n,) or (1, n), integer counts per sample (float blocks must hold
            non-negative finite values; they are truncated to integers)

        Raises
        ------
        ValueError
            Negative or non-finite values.
        """
        x = np.asarray(samples).reshape(-1)
        if x.dtype.kind == "f":
            if not np.all(np.isfinite(x)):
                raise ValueError("trigger input has negative or non-finite counts")
        if x.size and x.min() < 0:
            raise ValueError("trigger input has negative or non-finite counts")
        if self.triggered:
            self.samples_seen += len(x)
            return -1
        if x.dtype.kind not in "iu":
            x = x.astype(np.int64)  # integer blocks (uint16 from the detector) go to the kernel as they are
        if math.isnan(self.lam0):
            take = min(self.spec.history - self.samples_seen, len(x))
            self._base_sum += float(x[:take].sum())
            if self.samples_seen + take == self.spec.history:
                self.lam0 = self._base_sum / self.spec.history
        k = self._run(x, self._no_scores, True)
        if k >= 0:
            self.trigger_sample = self.samples_seen + k
        self.samples_seen += len(x)
        return k

    def _run(self, x: np.ndarray, scores: np.ndarray, stop: bool) -> int:
        s, m = self.spec, self.mlp
        return int(_stream(x, self._ring, self._state, s.window, s.blocks, s.block, s.shift, s.input_max, m.w_flat,
                           m.b_flat, m.dims, m.shifts, m.act_max, self._feat, self._a, self._z, self.threshold,
                           scores, stop))

    def stream_scores(self, counts: np.ndarray) -> np.ndarray:
        """Scores of every sample of a whole stream from a fresh history (for evaluation).

        Parameters
        ----------
        counts : ndarray, shape (n,), integer counts

        Returns
        -------
        ndarray, shape (n,), int64; ``-2**62`` for the first ``spec.history - 1`` samples (no decision).
        Leaves the trigger started afresh.
        """
        x = np.ascontiguousarray(counts, np.int64).reshape(-1)
        self.start()
        out = np.empty(len(x), np.int64)
        self._run(x, out, False)
        self.start()
        return out
