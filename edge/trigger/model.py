"""The quantized ejection trigger: a tiny integer MLP on the parked-probe ADF samples (numba, no torch).

The model was trained by ``beamloop quantize train --ship`` (Brevitas quantization-aware training,
:mod:`beamloop.quantize`) and ships in ``edge/models/trigger/`` (:data:`MODEL_DIR`) as a QONNX graph
(``<name>.onnx``, what the FPGA flow compiles), a plain-ONNX twin (``<name>_plain.onnx``) and the same
network as integers (``<name>_int.npz``), which this module runs. Its output is bit-exact with the QONNX
graph executed by qonnx (tests/test_trigger_model.py).

Input features (:class:`FeatureSpec`), all integers on the input quantiser's grid (scale 1), for the
sample ``t`` being decided on:

- ``window`` samples ``x[t-window+1 .. t]``, oldest first (detector counts per sample);
- ``blocks`` context sums of ``block`` samples each, covering the ``blocks * block`` samples just before
  the window, oldest first, each right-shifted by ``shift`` bits (``floor(sum / 2**shift)``);

each clipped to ``[0, 2**input_bits - 1]`` as the input quantiser saturates. The context lets the model
compare the last samples with the recent level instead of an absolute rate, so slow beam-current and
drift changes do not look like an ejection. In logic the context is a shift register and ``blocks``
accumulators.

Arithmetic per layer ``l``, with power-of-two scales (the fixed-point integer inference of B. Jacob et al.,
"Quantization and training of neural networks for efficient integer-arithmetic-only inference", CVPR 2018,
2704-2713, with scales restricted to powers of two so that requantisation is a shift; the QONNX ``Quant``
operator semantics of A. Pappalardo et al., "QONNX: Representing arbitrary-precision quantized neural
networks", arXiv:2206.07527 (2022)): ``acc = W_l @ a + b_l`` (integers; the accumulator's scale is
``s_a * s_w``), then for hidden layers ReLU and the activation quantiser with FLOOR rounding:
``a' = min(max(acc, 0) >> -e_l, 2**bits - 1)`` (``acc << e_l`` when ``e_l >= 0``), with
``2**e_l = s_a * s_w / s_out``. The last layer's accumulator is the score (a logit in units of
``output_scale``); the trigger fires when ``score >= threshold``.

The same integers run in FPGA logic (:mod:`beamloop.fpga.ip`), one sample per clock-enabled step. What the
logic holds and this module mirrors bit for bit:

- the **expected rate** of a dwell as an unsigned fixed-point word with :data:`RATE_FRACTION_BITS`
  fractional bits (:func:`rate_word`; 0 means "none"); the history before the first decision is
  pre-filled with the integer counts ``floor((j + 1) * word / 2**16) - floor(j * word / 2**16)``,
  ``j = 1 .. history - 1``, whose running sum follows the rate;
- a **score on every sample** (:meth:`ModelTrigger.update_scores`; :data:`NO_SCORE` before the history is
  full), also after the trigger has fired (the history keeps filling while the beam is blanked);
- a **latch** set by the first score ``>= threshold`` and cleared by :meth:`ModelTrigger.rearm`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numba
import numpy as np

from beamloop.edge.trigger.base import TriggerState, check_expected_rate

MODEL_DIR = Path(str(resources.files("beamloop.edge") / "models" / "trigger"))
"""Folder of the shipped trigger models inside the installed package (``manifest.json`` lists them)."""

NO_SCORE = -(1 << 62)
"""Score reported for a sample with too little history to decide on (see :meth:`ModelTrigger.update_scores`)."""

RATE_FRACTION_BITS = 16
"""Fractional bits of the expected-rate word (:func:`rate_word`): unsigned fixed point, counts per sample."""

RATE_WORD_MAX = (1 << 32) - 1
"""Largest expected-rate word (a 32-bit register)."""


def rate_word(expected_rate: float | None) -> int:
    """The integer the trigger holds for a dwell's expected rate (the logic's expected-rate register).

    Parameters
    ----------
    expected_rate : float or None
        Counts per sample of the intact column, or None (no expected rate: the trigger waits for a full
        history).

    Returns
    -------
    int
        0 for None; otherwise ``floor(expected_rate * 2**16 + 1/2)`` (round half up) clipped to
        ``[1, 2**32 - 1]``: unsigned fixed point with :data:`RATE_FRACTION_BITS` fractional bits.

    Raises
    ------
    ValueError
        ``expected_rate`` not finite or not positive.
    """
    rate = check_expected_rate(expected_rate)
    if rate is None:
        return 0
    return int(min(max(math.floor(rate * (1 << RATE_FRACTION_BITS) + 0.5), 1), RATE_WORD_MAX))


def prefill_counts(word: int, history: int) -> np.ndarray:
    """The ``history - 1`` counts a dwell with expected-rate word ``word`` starts with, oldest first.

    Count ``j`` (``j = 1 .. history - 1``) is ``floor((j + 1) * word / 2**16) - floor(j * word / 2**16)``,
    integer arithmetic only, so that the logic's accumulator (add ``word`` per sample, take the integer
    part) gives the same counts.

    Parameters
    ----------
    word : int
        Expected-rate word (:func:`rate_word`), ``>= 1``.
    history : int
        Samples per decision (:attr:`FeatureSpec.history`).

    Returns
    -------
    ndarray, shape (history - 1,), int64

    Raises
    ------
    ValueError
        ``word`` outside ``[1, 2**32 - 1]``.
    """
    if not 1 <= int(word) <= RATE_WORD_MAX:
        raise ValueError(f"expected-rate word must lie in [1, {RATE_WORD_MAX}], got {word}")
    acc = (np.arange(history + 1, dtype=np.int64) * np.int64(word)) >> RATE_FRACTION_BITS
    return np.diff(acc)[1:]


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

    The kernels run in int32 when no accumulator can leave the int32 range (``acc_bound``: bias plus the
    sum of ``|w| * largest input`` per output, the same bound as the manifest's ``acc_bits``), else in int64;
    both give the same integers. Weights are kept transposed (``in x out``, one contiguous row per input)
    and the kernels run each layer as multiply-adds along a tile of :data:`TILE` decisions (vectorised).
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
        self.weights = [np.asarray(w, np.int64) for w in self.weights]
        self.biases = [np.asarray(b, np.int64) for b in self.biases]
        self.shifts = np.asarray(self.shifts, np.int64)
        self.act_max = np.asarray(self.act_max, np.int64)
        dims = [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]
        self.dims = np.array(dims, np.int64)
        in_max = [int(self.input_max)] + [int(m) for m in self.act_max]
        self.acc_bound = max(int(np.max(np.abs(b) + np.abs(w) @ np.full(w.shape[1], m, np.int64)))
                             for w, b, m in zip(self.weights, self.biases, in_max))
        self.dtype = np.dtype(np.int32 if self.acc_bound < 2 ** 31 - 1 else np.int64)
        n = len(self.weights)
        w_off = np.cumsum([0] + [w.size for w in self.weights])
        b_off = w_off[-1] + np.cumsum([0] + [b.size for b in self.biases])
        # params: transposed weights of every layer, then every bias; meta: layer count, dims, offsets, shifts,
        # activation limits, input limit (layout read by _layers)
        self.params = np.concatenate([w.T.ravel() for w in self.weights] + self.biases).astype(self.dtype)
        self.meta = np.concatenate([[n], self.dims, w_off[:n], b_off[:n], self.shifts, self.act_max,
                                    [self.input_max]]).astype(np.int64)

    @classmethod
    def load(cls, path: Path) -> IntegerMLP:
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

    def work_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """Scratch arrays for the kernels: activations and accumulators, each (widest layer, :data:`TILE`),
        in :attr:`dtype`."""
        shape = (int(self.dims.max()), TILE)
        return np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Integer scores of input vectors.

        Parameters
        ----------
        features : ndarray, shape (n, n_in), integer, on the input grid (values outside ``[0, input_max]``
            are clipped, as the input quantiser does)

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
        _mlp_batch(f, self.params, self.meta, *self.work_buffers(), out)
        return out


TILE = 128
"""Decisions computed together per kernel pass: activations are held as (features x TILE) so that every
multiply-add runs along the samples (a long, contiguous, vectorisable loop)."""


@numba.njit(cache=True, nogil=True)
def _layers_tile(p, meta, act, acc, m):
    """The integer forward pass of ``m`` input vectors held as columns of ``act[:, :m]`` (on the input grid).

    ``p`` and ``meta`` as built by :class:`IntegerMLP`; ``act`` and ``acc`` are (width, TILE) scratch arrays of
    the network's dtype. Leaves the scores (last accumulators) in ``acc[0, :m]``."""
    n = meta[0]
    for layer in range(n):
        n_in = meta[1 + layer]
        n_out = meta[2 + layer]
        wo = meta[2 + n + layer]
        bo = meta[2 + 2 * n + layer]
        for o in range(n_out):
            zo = acc[o]
            bias = p[bo + o]
            for k in range(m):
                zo[k] = bias
            for i in range(n_in):
                w = p[wo + i * n_out + o]
                if w == 0:
                    continue
                ai = act[i]
                for k in range(m):
                    zo[k] += w * ai[k]
        if layer == n - 1:
            return
        e = meta[2 + 3 * n + layer]
        top = meta[1 + 4 * n + layer]
        for o in range(n_out):
            zo = acc[o]
            ao = act[o]
            if e >= 0:
                for k in range(m):
                    v = zo[k] << e if zo[k] > 0 else 0
                    ao[k] = top if v > top else v
            else:
                r = -e
                for k in range(m):
                    v = zo[k] >> r if zo[k] > 0 else 0
                    ao[k] = top if v > top else v


@numba.njit(cache=True, nogil=True)
def _mlp_batch(f, p, meta, act, acc, out):
    """Scores of feature rows ``f`` (n, n_in), int64, clipped to ``[0, input_max]`` first."""
    in_max = meta[meta.shape[0] - 1]
    tile = act.shape[1]
    for t0 in range(0, f.shape[0], tile):
        m = min(tile, f.shape[0] - t0)
        for i in range(f.shape[1]):
            ai = act[i]
            for k in range(m):
                v = f[t0 + k, i]
                ai[k] = 0 if v < 0 else (in_max if v > in_max else v)
        _layers_tile(p, meta, act, acc, m)
        for k in range(m):
            out[t0 + k] = acc[0, k]


@numba.njit(cache=True, nogil=True)
def _decide(x, hist, state, spec, p, meta, act, acc, cs, threshold, scores, stop):
    """Push a block of counts ``x`` through the history and decide on every sample with a full history.

    ``hist`` holds the last ``min(state[0], h - 1)`` samples (``h = spec.history``) followed by room for the
    block; ``state = [held samples]``; ``spec = [window, blocks, block, shift, input_max, sample_clip]``.
    Samples are clipped at ``sample_clip = max(input_max, (input_max + 1) << shift)`` on the way in, which
    changes no feature (a clipped sample saturates its window entry and its context sum either way).
    ``cs`` (int64, >= held + len(x) + 1) receives prefix sums; ``act``, ``acc`` as for :func:`_layers_tile`.
    ``scores`` (len(x) or 0) receives every score (:data:`NO_SCORE` before the history is full). Returns the
    block index of the first score ``>= threshold`` (deciding no further tile if ``stop``), -1 if none, or
    -2 (state untouched) if ``x`` holds a negative value.
    """
    n = x.shape[0]
    for k in range(n):
        if x[k] < 0:
            return -2
    window = spec[0]
    blocks = spec[1]
    block = spec[2]
    shift = spec[3]
    in_max = spec[4]
    clip = spec[5]
    h = window + blocks * block
    held = state[0]
    total = held + n
    for k in range(n):
        v = np.int64(x[k])
        hist[held + k] = clip if v > clip else v
    cs[0] = 0
    for t in range(total):
        cs[t + 1] = cs[t] + hist[t]
    record = scores.shape[0] == n
    if record:
        for k in range(min(n, h - 1 - held)):
            scores[k] = -(1 << 62)
    first = -1
    tile = act.shape[1]
    for t0 in range(max(held, h - 1), total, tile):
        m = min(tile, total - t0)
        for i in range(window):
            ai = act[i]
            base = t0 - window + 1 + i
            for k in range(m):
                v = hist[base + k]
                ai[k] = in_max if v > in_max else v
        for j in range(blocks):
            aj = act[window + j]
            lo = t0 - h + 1 + j * block
            for k in range(m):
                s = (cs[lo + k + block] - cs[lo + k]) >> shift
                aj[k] = in_max if s > in_max else s
        _layers_tile(p, meta, act, acc, m)
        z = acc[0]
        for k in range(m):
            sc = np.int64(z[k])
            if record:
                scores[t0 - held + k] = sc
            if sc >= threshold and first < 0:
                first = t0 - held + k
        if first >= 0 and stop:
            break
    keep = min(total, h - 1)
    for i in range(keep):
        hist[i] = hist[total - keep + i]
    state[0] = keep
    return first


@numba.njit(cache=True, nogil=True)
def _push(x, hist, state, h, clip):
    """Append a block of counts ``x`` to the history without deciding (the trigger has fired; the logic keeps
    filling its history while the beam is blanked). Layout of ``hist`` and ``state`` as for :func:`_decide`.
    Returns 0, or -2 (state untouched) if ``x`` holds a negative value."""
    n = x.shape[0]
    for k in range(n):
        if x[k] < 0:
            return -2
    held = state[0]
    keep = h - 1
    if n >= keep:
        for i in range(keep):
            v = np.int64(x[n - keep + i])
            hist[i] = clip if v > clip else v
        state[0] = keep
        return 0
    drop = max(held + n - keep, 0)
    for i in range(held - drop):
        hist[i] = hist[drop + i]
    base = held - drop
    for k in range(n):
        v = np.int64(x[k])
        hist[base + k] = clip if v > clip else v
    state[0] = base + n
    return 0


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


def model_hash(model: str, model_dir: Path | None = None) -> str:
    """The identity of a shipped trigger model: SHA-256 of its integer file (``<name>_int.npz``, what the
    runtime and the FPGA logic compute), as 64 lowercase hex digits.

    Parameters
    ----------
    model : str
        Entry of ``manifest.json``.
    model_dir : path, optional
        Folder of the manifest (default :data:`MODEL_DIR`).

    Raises
    ------
    FileNotFoundError
        Manifest or model file missing.
    KeyError
        ``model`` not in the manifest.
    """
    d = Path(model_dir or MODEL_DIR)
    entry = load_manifest(d)["models"][model]
    return hashlib.sha256((d / entry["files"]["integer"]).read_bytes()).hexdigest()


def sample_trigger_models(model_dir: Path | None = None) -> dict[str, dict]:
    """The shipped models that decide on a stream of ADF samples (manifest entries with ``features``), as a
    scan controller offers them (``get_capabilities``, ``arm_trigger``).

    Parameters
    ----------
    model_dir : path, optional
        Folder of the manifest (default :data:`MODEL_DIR`).

    Returns
    -------
    dict
        name -> ``{"hash"`` (:func:`model_hash`), ``"threshold"`` (the calibrated integer score threshold),
        ``"history"`` (samples per decision), ``"sample_time_us"`` (the sample time it was trained for),
        ``"latency_cycles"``, ``"clock_mhz"``, ``"latency_ns"`` (the manifest's ``logic`` entry, written by
        ``beamloop fpga build --record``; None where the model has no logic build recorded)``}``.

    Raises
    ------
    FileNotFoundError
        No manifest, or a model file missing.
    """
    d = Path(model_dir or MODEL_DIR)
    out = {}
    for name, entry in load_manifest(d)["models"].items():
        if "features" not in entry:
            continue
        logic = entry.get("logic") or {}
        out[name] = {"hash": model_hash(name, d), "threshold": int(entry["threshold"]["score"]),
                     "history": FeatureSpec(**entry["features"]).history,
                     "sample_time_us": float(entry.get("sample_time_us", 10.0)),
                     "latency_cycles": logic.get("latency_cycles"), "clock_mhz": logic.get("clock_mhz"),
                     "latency_ns": logic.get("latency_ns")}
    return out


DEFAULT_MODEL = "ejection_h16"
"""The shipped model the ``model`` trigger runs unless told otherwise: the 36-16-1 network, whose IP takes a
raw sample to the blank in 9 cycles (78.5 ns at its 114.7 MHz fmax, 90 ns at the 100 MHz it is rated for, on
LFE5U-85F) with the detection of the 36-16-8-1 ``ejection`` (14 cycles, 140 ns at 100 MHz) on the same
held-out dwells."""


class ModelTrigger(TriggerState):
    """The quantized ejection trigger, a :class:`~beamloop.edge.trigger.base.Trigger`.

    One :meth:`update` is one numba call for the whole block (no per-sample Python, no allocation); per
    tile of up to :data:`TILE` samples it builds the features from a history buffer and prefix sums and runs
    the integer network (int32 multiply-adds vectorised along the samples). ``bench/trigger_decision.py`` times it.

    The FPGA trigger (:mod:`beamloop.fpga.ip`) computes the same integers; to emulate it sample for sample:
    :meth:`start` with the dwell's expected rate (the logic's expected-rate register holds
    :attr:`rate_word`), :meth:`update` per block (index of the first firing sample) or
    :meth:`update_scores` (also the score of every sample), :meth:`rearm` where the logic's latch is
    cleared, and :attr:`logic_latency_ns` added to the decision sample's time for the blanking time.

    Parameters
    ----------
    model : str
        Entry of ``manifest.json`` (default :data:`DEFAULT_MODEL`).
    threshold : int, optional
        Alarm threshold on the integer score; default the manifest's operating point.
    model_dir : path, optional
        Folder holding ``manifest.json`` and the model files (default :data:`MODEL_DIR`).
    max_block : int
        Samples the history buffer takes per kernel call; longer blocks are split into calls of this size.

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

    def __init__(self, model: str = DEFAULT_MODEL, threshold: int | None = None, model_dir: Path | None = None,
                 max_block: int = 4096) -> None:
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
        s = self.spec
        clip = max(s.input_max, (s.input_max + 1) << s.shift)
        self._spec = np.array([s.window, s.blocks, s.block, s.shift, s.input_max, clip], np.int64)
        self._max_block = int(max_block)
        self._hist = np.zeros(s.history - 1 + self._max_block, np.int64)
        self._cs = np.zeros(len(self._hist) + 1, np.int64)
        self._state = np.zeros(1, np.int64)
        self._act, self._acc = self.mlp.work_buffers()
        self._no_scores = np.zeros(0, np.int64)
        self.logic = dict(entry.get("logic") or {})
        self.rate_word = 0
        self.start()

    def start(self, expected_rate: float | None = None) -> None:
        """Begin a new dwell.

        Without ``expected_rate`` the first decision comes once ``spec.history`` samples have arrived (as
        the classical triggers wait for their baseline). With it (counts per sample), the history is
        pre-filled with ``spec.history - 1`` integer counts whose running sum follows the rate
        (:func:`prefill_counts` of :attr:`rate_word`, the value of the logic's expected-rate register), so
        that decisions start at the first sample. :attr:`baseline_rate` is the expected rate, or the mean of
        the first ``spec.history`` samples (the network itself reads no rate; this is what the dwell reports).

        Raises
        ------
        ValueError
            ``expected_rate`` not finite or not positive.
        """
        rate = self.begin_dwell(expected_rate)
        self.rate_word = rate_word(rate)
        self._base_sum = 0.0
        self._state[0] = 0
        if rate is not None:
            h = self.spec.history
            self._hist[:h - 1] = prefill_counts(self.rate_word, h)  # the last h - 1 samples of a history of h
            self._state[0] = h - 1

    def rearm(self) -> None:
        """Clear the latch (as writing 1 to the logic's latch bit): :attr:`trigger_sample` becomes -1 and the
        next sample whose score reaches the threshold fires again. The history and the sample count carry on
        (they kept filling while the trigger was latched)."""
        self.trigger_sample = -1

    @property
    def logic_latency_cycles(self) -> int | None:
        """Clock cycles from a sample entering the FPGA trigger to its blank output (the manifest's ``logic``
        entry, written by ``beamloop fpga build --record``); None when the model has no logic build."""
        v = self.logic.get("latency_cycles")
        return None if v is None else int(v)

    @property
    def logic_latency_ns(self) -> float:
        """Nanoseconds from a sample entering the FPGA trigger to its blank output at the clock the logic is
        rated for (``logic.latency_ns`` of the manifest entry: ``latency_cycles`` at ``logic.clock_mhz``); NaN
        when the model has no logic build. The blanking time of a decision on sample ``k`` of a dwell is the
        end of sample ``k`` plus this."""
        v = self.logic.get("latency_ns")
        return math.nan if v is None else float(v)

    def history(self) -> np.ndarray:
        """Copy of the samples held for the next decision (up to ``spec.history - 1``, oldest first, clipped
        as described in :func:`_decide`)."""
        return self._hist[:int(self._state[0])].copy()

    @staticmethod
    def _as_counts(block: np.ndarray) -> np.ndarray:
        """``block`` as a 1-D integer array; raises ``ValueError`` for negative or non-finite floats."""
        x = block if type(block) is np.ndarray and block.ndim == 1 else np.asarray(block).reshape(-1)
        if x.dtype.kind not in "iu":
            if x.dtype.kind != "f" or not np.all(np.isfinite(x)) or np.any(x < 0):
                raise ValueError("trigger input has negative or non-finite counts")
            x = x.astype(np.int64)  # integer blocks (uint16 from the detector) go to the kernel as they are
        return x

    def _push_history(self, x: np.ndarray) -> None:
        """Append ``x`` to the history without deciding; raises ``ValueError`` for a negative count."""
        s = self._spec
        for a in range(0, len(x), self._max_block):
            if _push(x[a:a + self._max_block], self._hist, self._state, int(s[0] + s[1] * s[2]), int(s[5])) == -2:
                raise ValueError("trigger input has negative or non-finite counts")

    def update(self, block: np.ndarray) -> int:
        """Feed a block of counts; return the index within it of the alarm, or -1.

        Parameters
        ----------
        block : ndarray, shape (n,) or (1, n), integer counts per sample (float blocks must hold
            non-negative finite values; they are truncated to integers)

        Returns
        -------
        int
            Index in ``block`` of the first sample whose score reaches the threshold, -1 if none (or if the
            trigger had already fired; its history keeps filling, as the logic's does).

        Raises
        ------
        ValueError
            Negative or non-finite values (the trigger's state is left as it was).
        """
        x = self._as_counts(block)
        if self.trigger_sample >= 0:
            self._push_history(x)
            self.samples_seen += len(x)
            return -1
        return self._feed(x, self._no_scores, True)

    def update_scores(self, block: np.ndarray) -> tuple[int, np.ndarray]:
        """:meth:`update` that also returns the score of every sample of the block, as the logic reports one
        per sample (also after the trigger has fired).

        Parameters
        ----------
        block : ndarray, shape (n,) or (1, n), counts per sample (as for :meth:`update`)

        Returns
        -------
        first : int
            Index in ``block`` of the sample that fired the trigger (the first score ``>= threshold`` while
            not latched), or -1.
        scores : ndarray, shape (n,), int64
            Integer score of every sample; :data:`NO_SCORE` where the history was not yet full.

        Raises
        ------
        ValueError
            Negative or non-finite values (the trigger's state is left as it was).
        """
        x = self._as_counts(block)
        scores = np.empty(len(x), np.int64)
        if self.trigger_sample >= 0:
            self._run(x, scores, False)
            self.samples_seen += len(x)
            return -1, scores
        return self._feed(x, scores, False), scores

    def _feed(self, x: np.ndarray, scores: np.ndarray, stop: bool) -> int:
        """Decide on ``x`` (the trigger not latched): baseline bookkeeping, kernel, firing sample; returns
        the firing index in ``x`` or -1; ``scores`` (len(x) or 0) receives every score."""
        baseline = self.samples_seen < self.spec.history and math.isnan(self.baseline_rate)
        if baseline:
            take = min(self.spec.history - self.samples_seen, len(x))
            base_sum = self._base_sum + float(x[:take].sum())
        if len(x) <= self._max_block:
            m = self.mlp
            k = int(_decide(x, self._hist, self._state, self._spec, m.params, m.meta, self._act, self._acc, self._cs,
                            self.threshold, scores, stop))
            if k == -2:
                raise ValueError("trigger input has negative or non-finite counts")
        else:
            k = self._run(x, scores, stop)
        if baseline:
            self._base_sum = base_sum
            if self.samples_seen + take == self.spec.history:
                self.baseline_rate = self._base_sum / self.spec.history
        if k >= 0:
            self.trigger_sample = self.samples_seen + k
        self.samples_seen += len(x)
        return k

    def _run(self, x: np.ndarray, scores: np.ndarray, stop: bool) -> int:
        """Run the kernel over ``x`` in calls of at most ``max_block`` samples; returns the index of the first
        score ``>= threshold`` or -1 (stopping there if ``stop``); raises ``ValueError`` for a negative count
        (a negative count after the first call leaves the earlier calls' samples in the history)."""
        m = self.mlp
        step = self._max_block
        first = -1
        for a in range(0, max(len(x), 1), step):
            xs = x[a:a + step]
            sc = scores[a:a + step] if len(scores) else scores
            k = int(_decide(xs, self._hist, self._state, self._spec, m.params, m.meta, self._act, self._acc, self._cs,
                            self.threshold, sc, stop))
            if k == -2:
                raise ValueError("trigger input has negative or non-finite counts")
            if k >= 0 and first < 0:
                first = a + k
                if stop:
                    break
        return first

    def stream_scores(self, counts: np.ndarray, expected_rate: float | None = None) -> np.ndarray:
        """Scores of every sample of a whole stream from a fresh history (for evaluation).

        Parameters
        ----------
        counts : ndarray, shape (n,), integer counts
        expected_rate : float, optional
            The dwell's expected rate (as for :meth:`start`): decisions from the first sample.

        Returns
        -------
        ndarray, shape (n,), int64; :data:`NO_SCORE` (``-2**62``) for the first ``spec.history - 1`` samples
        (no decision) unless an expected rate is given. Leaves the trigger started afresh.
        """
        x = np.ascontiguousarray(counts).reshape(-1)
        if x.dtype.kind not in "iu":
            x = x.astype(np.int64)
        self.start(expected_rate)
        out = np.empty(len(x), np.int64)
        self._run(x, out, False)
        self.start()
        return out
