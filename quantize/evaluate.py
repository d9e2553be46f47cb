"""Evaluation of ejection triggers on held-out simulated dwells (``beamloop quantize eval``).

Every method (the quantized model as the service runs it, its float twin, CUSUM, the moving-window
threshold) is reduced to a statistic per sample; a trigger with threshold ``thr`` fires at the first
sample whose statistic reaches ``thr``, and the dwell ends there (the beam is blanked). On a set of
dwells with known event samples this gives, for any threshold:

- **false-trigger rate per second of dwell**: alarms before the event divided by the time the beam
  spent on intact columns (each dwell counts until its alarm or its event);
- **detection delay**: lowered-rate samples seen up to and including the alarm sample (as
  :func:`beamloop.edge.experiments.closed_loop.dwell_summary` counts it: alarm sample minus the microscope's
  ejection sample);
- **missed**: no alarm within the dwell's tail after the event.

Thresholds are calibrated on one set of dwells for a target false-trigger rate (the smallest threshold
whose rate does not exceed it) and the figures are reported on another set ("equal false-trigger
rate"). Each method is also reported at the threshold the service uses by default
(:func:`service_thresholds`). The ROC compares single decisions: positives ``roc_delay`` samples after
the event, negatives every pre-event decision.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beamloop.edge.trigger.model import MODEL_DIR, ModelTrigger, load_manifest, window_features
from beamloop.quantize.baselines import cusum_statistic, window_statistic
from beamloop.quantize.data import NO_EVENT, StreamConditions, Streams, dwell_streams
from beamloop.quantize.manifest import write_manifest

METHODS = ("model", "float", "cusum", "window")
"""Methods compared: quantized model (integer runtime), float model, CUSUM, moving-window threshold."""


class FloatMLP:
    """The float twin of the shipped model (``<name>_float.npz``: ``w0.. b0..`` float32, (out, in))."""

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            n = int(z["layers"])
            self.weights = [z[f"w{k}"].astype(np.float32) for k in range(n)]
            self.biases = [z[f"b{k}"].astype(np.float32) for k in range(n)]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of feature vectors ``x`` (n, n_in) -> (n,) float32."""
        a = np.asarray(x, np.float32)
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            a = a @ w.T + b
            if k < len(self.weights) - 1:
                np.maximum(a, 0, out=a)
        return a.reshape(-1)


def save_float(model, path: Path) -> None:
    """Write a torch float MLP's linear layers to the ``.npz`` :class:`FloatMLP` reads."""
    from torch import nn

    lin = [m for m in model if isinstance(m, nn.Linear)]
    arrays = {f"w{k}": m.weight.detach().numpy().astype(np.float32) for k, m in enumerate(lin)}
    arrays.update({f"b{k}": m.bias.detach().numpy().astype(np.float32) for k, m in enumerate(lin)})
    np.savez(path, layers=len(lin), **arrays)


def method_scores(streams: Streams, method: str, trigger: ModelTrigger | None = None,
                  float_mlp: FloatMLP | None = None, cusum_options: dict | None = None,
                  window_options: dict | None = None) -> list[np.ndarray]:
    """The per-sample statistic of ``method`` on every stream (float64; ``-inf`` where it cannot decide).

    Raises ``ValueError`` for an unknown method or a model method without its model.
    """
    out = []
    for counts in streams.counts:
        if method == "model":
            if trigger is None:
                raise ValueError("method 'model' needs the ModelTrigger")
            s = trigger.stream_scores(counts).astype(np.float64)
            s[s <= -(2.0 ** 61)] = -np.inf
        elif method == "float":
            if float_mlp is None or trigger is None:
                raise ValueError("method 'float' needs the float network and the model's feature spec")
            spec = trigger.spec
            s = np.full(len(counts), -np.inf)
            for a in range(spec.history - 1, len(counts), 65536):
                ends = np.arange(a, min(a + 65536, len(counts)))
                s[ends] = float_mlp.logits(window_features(counts, spec, ends))
        elif method == "cusum":
            s = cusum_statistic(counts, **(cusum_options or {}))
        elif method == "window":
            s = window_statistic(counts, **(window_options or {}))
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        out.append(s)
    return out


@dataclass
class Sweep:
    """Sequential figures for a range of thresholds (arrays of shape (n_thresholds,)).

    Attributes
    ----------
    thresholds : ndarray
    false_triggers : ndarray of int
    exposure_s : ndarray
        Seconds of dwell on intact columns.
    fa_per_s : ndarray
        False triggers per second of dwell.
    delay_p50, delay_mean, delay_p90 : ndarray
        Detection delay over detected events, samples.
    missed : ndarray
        Fraction of events (in dwells without a false trigger) not detected within the tail.
    """

    thresholds: np.ndarray
    false_triggers: np.ndarray
    exposure_s: np.ndarray
    fa_per_s: np.ndarray
    delay_p50: np.ndarray
    delay_mean: np.ndarray
    delay_p90: np.ndarray
    missed: np.ndarray

    def at(self, k: int) -> dict:
        """Figures at threshold index ``k`` as a dict."""
        return {"threshold": float(self.thresholds[k]), "false_triggers": int(self.false_triggers[k]),
                "exposure_s": float(self.exposure_s[k]), "fa_per_s": float(self.fa_per_s[k]),
                "delay_p50": float(self.delay_p50[k]), "delay_mean": float(self.delay_mean[k]),
                "delay_p90": float(self.delay_p90[k]), "missed": float(self.missed[k])}


def candidate_thresholds(scores: list[np.ndarray], events: np.ndarray, extra: int = 40) -> np.ndarray:
    """Thresholds at which the false-trigger count changes (just above each dwell's largest pre-event
    statistic), plus ``extra`` values up to the post-event statistics' 99th percentile."""
    pre = []
    post = []
    for s, ev in zip(scores, events):
        head = s if ev == NO_EVENT else s[:ev]
        fin = head[np.isfinite(head)]
        if fin.size:
            pre.append(fin.max())
        if ev != NO_EVENT:
            tail = s[ev:][np.isfinite(s[ev:])]
            if tail.size:
                post.append(tail.max())
    pre = np.nextafter(np.unique(pre), np.inf)
    top = max(pre.max() if pre.size else 0.0, np.percentile(post, 99) if post else 0.0)
    hi = np.linspace(pre.max() if pre.size else 0.0, top, extra)
    return np.unique(np.concatenate([pre, np.nextafter(hi, np.inf)]))


def sweep(scores: list[np.ndarray], events: np.ndarray, thresholds: np.ndarray, sample_time_us: float) -> Sweep:
    """Sequential figures (see the module docstring) at every threshold (ascending)."""
    thr = np.sort(np.asarray(thresholds, np.float64))
    nt = len(thr)
    false = np.zeros(nt, np.int64)
    exposure = np.zeros(nt, np.int64)
    delays = [[] for _ in range(nt)]
    events_ok = np.zeros(nt, np.int64)
    missed = np.zeros(nt, np.int64)
    for s, ev in zip(scores, events):
        pre = s if ev == NO_EVENT else s[:ev]
        idx = np.searchsorted(np.maximum.accumulate(pre), thr, side="left") if len(pre) else np.zeros(nt, int)
        fired = idx < len(pre)
        false += fired
        exposure += np.where(fired, idx + 1, len(pre))
        if ev == NO_EVENT:
            continue
        post = s[ev:]
        jdx = np.searchsorted(np.maximum.accumulate(post), thr, side="left")
        ok = ~fired
        events_ok += ok
        hit = ok & (jdx < len(post))
        missed += ok & ~hit
        for k in np.flatnonzero(hit):
            delays[k].append(jdx[k] + 1)
    dt = sample_time_us * 1e-6
    exp_s = exposure * dt

    def stat(f):
        """``f`` of the delays at each threshold (NaN where none was detected)."""
        return np.array([f(np.asarray(d)) if len(d) else np.nan for d in delays])

    return Sweep(thr, false, exp_s, false / np.maximum(exp_s, 1e-12), stat(lambda d: np.percentile(d, 50)),
                 stat(np.mean), stat(lambda d: np.percentile(d, 90)), missed / np.maximum(events_ok, 1))


def calibrate(sw: Sweep, target_fa_per_s: float) -> float:
    """Smallest threshold whose false-trigger rate does not exceed the target (``inf`` if none does)."""
    ok = np.flatnonzero(sw.fa_per_s <= target_fa_per_s)
    return float(sw.thresholds[ok[0]]) if ok.size else float("inf")


def delay_at_fa(sw: Sweep, fa_per_s: float, max_missed: float = 0.2) -> float:
    """Median delay at the smallest threshold whose false-trigger rate is at most ``fa_per_s`` (samples);
    NaN when no threshold reaches that rate or the threshold misses more than ``max_missed`` of the events
    (a median over the few events still detected says nothing)."""
    ok = np.flatnonzero(sw.fa_per_s <= fa_per_s)
    if not ok.size or sw.missed[ok[0]] > max_missed:
        return float("nan")
    return float(sw.delay_p50[ok[0]])


def binary_roc(labels: np.ndarray, scores: np.ndarray,
               drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve and its area for a score against binary labels (scikit-learn's estimators).

    Tied scores form one threshold: the curve takes one diagonal step over a tied group and the area
    counts each tied positive-negative pair as one half, so that the area equals the Mann-Whitney
    probability ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` (J. A. Hanley & B. J. McNeil, Radiology 143,
    29-36 (1982); T. Fawcett, Pattern Recognit. Lett. 27, 861-874 (2006), algorithm 2). An all-tied
    score therefore has area 0.5.

    Parameters
    ----------
    labels : ndarray, shape (n,), bool or numeric
        True (or > 0.5) for positives.
    scores : ndarray, shape (n,), finite, numeric
        Higher means more likely positive.
    drop_intermediate : bool
        Leave out points of the curve that lie on a straight segment between their neighbours (the
        area does not change; see :func:`sklearn.metrics.roc_curve`).

    Returns
    -------
    fpr, tpr : ndarray, float64
        False- and true-positive rates, ascending, from (0, 0) to (1, 1).
    auc : float
        Area under the curve, :func:`sklearn.metrics.roc_auc_score`.

    Raises
    ------
    ValueError
        Labels of one class only, different lengths, or a non-finite score.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels)
    y = y if y.dtype == bool else y > 0.5
    s = np.asarray(scores, np.float64)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"ROC needs positives and negatives, got {n_pos} positives of {y.size}")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return fpr, tpr, float(roc_auc_score(y, s))


def roc(scores: list[np.ndarray], events: np.ndarray, delay: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Single-decision ROC over dwells with known event samples.

    The decisions compared are chosen here: positives are the decisions ``delay`` lowered-rate samples
    after each event (sample ``event + delay - 1``), negatives every decision before the event (all of
    a dwell without one). A positive that cannot decide (``-inf``: too little history) counts as the
    lowest score; negatives that cannot decide are left out. The curve and its area are
    :func:`binary_roc`'s.

    Parameters
    ----------
    scores : list of ndarray, shape (n_i,), float64
        Per-sample statistic of each dwell (:func:`method_scores`).
    events : ndarray, shape (n_dwells,), int64
        Event sample of each dwell or :data:`beamloop.quantize.data.NO_EVENT`.
    delay : int
        Lowered-rate samples seen by a positive decision (>= 1).

    Returns
    -------
    fpr, tpr : ndarray, float64
        Per-decision false- and true-positive rates, ascending.
    auc : float
        Area under the curve.

    Raises
    ------
    ValueError
        No positive or no negative decision.
    """
    pos = np.array([s[ev + delay - 1] for s, ev in zip(scores, events) if ev != NO_EVENT and ev + delay <= len(s)])
    neg = np.concatenate([(s if ev == NO_EVENT else s[:ev]) for s, ev in zip(scores, events)])
    neg = neg[np.isfinite(neg)]
    if not len(pos) or not len(neg):
        raise ValueError(f"ROC needs positive and negative decisions, got {len(pos)} and {len(neg)}")
    pos = np.where(np.isfinite(pos), pos, -1e300)
    labels = np.concatenate([np.zeros(len(neg), bool), np.ones(len(pos), bool)])
    return binary_roc(labels, np.concatenate([neg, pos]))


def plot(path: Path, curves: dict, rocs: dict, title: str, roc_delay: int, targets: list[float]) -> None:
    """ROC (log false-positive rate) and median delay versus false-trigger rate per second, per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(curves)
    fig, axes = plt.subplots(2, len(conds), figsize=(6 * len(conds), 9), squeeze=False)
    styles = {"model": ("C0", "-"), "float": ("C0", ":"), "cusum": ("C3", "-"), "window": ("C2", "--")}
    for c, cond in enumerate(conds):
        ax = axes[0, c]
        for m, (fpr, tpr, auc) in rocs[cond].items():
            col, ls = styles[m]
            ax.plot(np.maximum(fpr, 1e-9), tpr, color=col, ls=ls, label=f"{m} (AUC {auc:.4f})")
        ax.set_xscale("log")
        ax.set_xlim(1e-8, 1)
        ax.set_xlabel("false-positive rate per decision")
        ax.set_ylabel(f"true-positive rate, {roc_delay} samples after the event")
        ax.set_title(f"{cond}: ROC of single decisions")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1, c]
        for m, sw in curves[cond].items():
            col, ls = styles[m]
            ok = (sw.false_triggers > 0) & (sw.missed <= 0.2)  # a median over few detected events misleads
            ax.plot(sw.fa_per_s[ok], sw.delay_p50[ok], color=col, ls=ls, label=m)
        for t in targets:
            ax.axvline(t, color="k", lw=0.6, alpha=0.4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("false triggers per second of dwell")
        ax.set_ylabel("median detection delay, samples (10 us)")
        ax.set_title(f"{cond}: delay at equal false-trigger rate\n(thresholds missing > 20 % of events left out)",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_number(v: float) -> float | None:
    """``v``, or None (JSON null) where it is NaN (no threshold reaches that false-trigger rate)."""
    return None if np.isnan(v) else v


def service_thresholds(trig: ModelTrigger) -> dict:
    """Each method's default threshold in the service, on the scale of :func:`method_scores`.

    The model: the manifest's integer score threshold (``score >= threshold`` fires). CUSUM and the moving
    window fire when their statistic is strictly above ``h`` / ``1 - fraction`` (:mod:`beamloop.edge.trigger.classical`
    defaults), hence the next float up. The float twin has no service threshold."""
    from beamloop.edge.trigger.classical import CusumTrigger, WindowTrigger

    c, w = CusumTrigger(), WindowTrigger()
    return {"model": float(trig.threshold), "cusum": float(np.nextafter(c.h, np.inf)),
            "window": float(np.nextafter(1.0 - w.fraction, np.inf))}


def evaluate(out: Path, model_dir: Path | None = None, model: str = "ejection", dwells: int = 1500,
             seed: int = 100, target_fa_per_s: float = 0.05, roc_delay: int = 16,
             conditions: dict | None = None, update_manifest: bool = False, progress=print) -> dict:
    """Calibrate every method on one set of dwells and report it on another, per stream condition.

    Parameters
    ----------
    out : Path
        Folder for ``eval.json`` and ``roc.png``.
    model_dir : Path, optional
        Folder of the manifest and model files (default the shipped one).
    model : str
        Manifest entry.
    dwells : int
        Dwells per set (two sets, calibration and test, per condition).
    seed : int
        Seed of the first set (never one used in training: training seeds are < 100).
    target_fa_per_s : float
        False-trigger rate at which thresholds are calibrated, per second of dwell.
    roc_delay : int
        Lowered samples before the decision of the ROC's positives.
    conditions : dict of name -> StreamConditions, optional
        Default: ``clean`` (the main job's microscope) and ``nuisance`` (training ranges).
    update_manifest : bool
        Store the report under ``metrics.evaluation`` of the model's manifest entry.

    Returns
    -------
    dict, also written to ``out/eval.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = Path(model_dir or MODEL_DIR)
    entry = load_manifest(d)["models"][model]
    trig = ModelTrigger(model, model_dir=d)
    fm = FloatMLP(d / entry["files"]["float"])
    conditions = conditions or {"clean": StreamConditions.clean(), "nuisance": StreamConditions()}
    report = {"model": model, "target_fa_per_s": target_fa_per_s, "dwells_per_set": dwells, "roc_delay": roc_delay,
              "features": trig.spec.as_dict(), "conditions": {}, "date": time.strftime("%Y-%m-%d")}
    curves, rocs = {}, {}
    for ci, (name, cond) in enumerate(conditions.items()):
        t0 = time.perf_counter()
        cal = dwell_streams(dwells, cond, seed + 10 * ci)
        test = dwell_streams(dwells, cond, seed + 10 * ci + 1)
        res = {"calibration_s": cal.seconds, "test_s": test.seconds, "methods": {}}
        curves[name], rocs[name] = {}, {}
        for m in METHODS:
            sc_cal = method_scores(cal, m, trig, fm)
            sw_cal = sweep(sc_cal, cal.event, candidate_thresholds(sc_cal, cal.event), cal.sample_time_us)
            thr = calibrate(sw_cal, target_fa_per_s)
            sc = method_scores(test, m, trig, fm)
            sw = sweep(sc, test.event, candidate_thresholds(sc, test.event), test.sample_time_us)
            at = sweep(sc, test.event, np.array([thr]), test.sample_time_us).at(0)
            res["methods"][m] = {"calibrated": at,
                                 "delay_p50_at_fa": {str(f): _json_number(delay_at_fa(sw, f))
                                                     for f in (0.01, 0.05, 0.2, 1.0)}}
            curves[name][m] = sw
            rocs[name][m] = roc(sc, test.event, roc_delay)
            res["methods"][m]["roc_auc"] = rocs[name][m][2]
            op = service_thresholds(trig).get(m)
            if op is not None:  # where the service's default threshold puts this method on these dwells
                res["methods"][m]["service_default"] = sweep(sc, test.event, np.array([op]), test.sample_time_us).at(0)
        res["seconds"] = time.perf_counter() - t0
        report["conditions"][name] = res
        progress(format_condition(name, res))
    plot(out / "roc.png", curves, rocs, f"{model}: {dwells} test dwells per condition", roc_delay, [target_fa_per_s])
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    if update_manifest:
        entry = load_manifest(d)["models"][model]
        entry.setdefault("metrics", {})["evaluation"] = report
        write_manifest(d, model, entry)
    return report


def format_condition(name: str, res: dict) -> str:
    """A small table of one condition's calibrated figures."""
    lines = [f"{name}: test {res['test_s']:.0f} s of dwell (thresholds calibrated on {res['calibration_s']:.0f} s)",
             f"  {'method':<8}{'threshold':>12}{'FA/s':>8}{'false':>7}{'delay p50':>11}{'mean':>7}{'p90':>6}"
             f"{'missed':>8}{'AUC':>8}"]
    for m, r in res["methods"].items():
        c = r["calibrated"]
        lines.append(f"  {m:<8}{c['threshold']:>12.4g}{c['fa_per_s']:>8.3f}{c['false_triggers']:>7d}"
                     f"{c['delay_p50']:>11.1f}{c['delay_mean']:>7.1f}{c['delay_p90']:>6.0f}{c['missed']:>8.4f}"
                     f"{r['roc_auc']:>8.4f}")
    lines.append("  at the service's default thresholds:")
    for m, r in res["methods"].items():
        c = r.get("service_default")
        if c:
            lines.append(f"  {m:<8}{c['threshold']:>12.4g}{c['fa_per_s']:>8.3f}{c['false_triggers']:>7d}"
                         f"{c['delay_p50']:>11.1f}{c['delay_mean']:>7.1f}{c['delay_p90']:>6.0f}{c['missed']:>8.4f}")
    return "\n".join(lines)


def window_accuracy(x: np.ndarray, y: np.ndarray, logits: np.ndarray) -> dict:
    """Accuracy at logit 0 and ROC AUC of single decisions (the float and quantized figures of a manifest).

    Parameters
    ----------
    x : ndarray, shape (n, n_features)
        The inputs (not used: the figures depend on labels and logits only).
    y : ndarray, shape (n,), float32
        Labels, 1 for positives.
    logits : ndarray, shape (n,)
        Float logits, or integer scores (any positive multiple of the logit gives the same figures).

    Returns
    -------
    dict
        ``windows`` (n), ``accuracy`` (fraction with ``(logit >= 0) == (y > 0.5)``) and ``auc``
        (:func:`binary_roc`: tied scores count one half).

    Raises
    ------
    ValueError
        Labels of one class only.
    """
    logits = np.asarray(logits, np.float64).reshape(-1)
    pred = logits >= 0
    return {"windows": int(len(y)), "accuracy": float(np.mean(pred == (y > 0.5))),
            "auc": binary_roc(y, logits)[2]}
