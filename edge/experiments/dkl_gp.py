"""The serving half of deep kernel learning: a Gaussian process posterior in the embedding, acquisition
functions and batch selection, in numpy (no torch).

Deep kernel learning (A. G. Wilson, Z. Hu, R. Salakhutdinov & E. P. Xing, "Deep Kernel Learning",
AISTATS 2016) puts a Gaussian process on the output of a neural network: ``k(x, x') = k_RBF(g(x), g(x'))``
with ``g`` the embedding. Training (:mod:`beamloop.edge.experiments.dkl_model`, torch and gpytorch) fits the
network and the kernel's hyperparameters jointly by the exact marginal likelihood; deciding where to
measure next needs only the embedding of the candidates and the posterior in that space, which this module
computes from a :class:`GPState` (the training embeddings, the kernel's hyperparameters and the Cholesky
factor). :class:`OnnxPredictor` runs the embedding exported to ONNX with ONNX Runtime, so the edge service
can predict (and choose points) without torch.

Acquisition functions (:data:`ACQUISITIONS`; all maximised, on the posterior of the objective):

``ei``       expected improvement over the best observation ``f*``: ``(mu - f* - xi) Phi(z) + sigma phi(z)``,
             ``z = (mu - f* - xi) / sigma`` (D. R. Jones, M. Schonlau & W. J. Welch, J. Glob. Optim. 13, 455
             (1998))
``ucb``      upper confidence bound ``mu + sqrt(beta) sigma`` (N. Srinivas et al., ICML 2010)
``maxvar``   posterior variance ``sigma^2`` (pure exploration: uncertainty sampling)

Batches (:func:`select_batch`): ``fantasy`` is greedy selection with fantasised observations (the
"kriging believer" of D. Ginsbourger, R. Le Riche & L. Carraro, 2010: each chosen point is added to the
posterior at its predicted mean, which shrinks the variance around it before the next choice);
``exclusion`` takes the best ``k`` at least ``exclusion`` apart in the candidates' positions.

In the STEM setting (K. M. Roccapriore, S. V. Kalinin, M. Ziatdinov et al., "Physics discovery in
nanoplasmonic systems via autonomous experiments in scanning transmission electron microscopy",
Adv. Sci. 9, 2203422 (2022); "Automated experiment in 4D-STEM: exploring emergent physics and structural
behaviors", ACS Nano 16, 7605 (2022)) the inputs are image patches at candidate positions and the targets
scalars of a spectrum or diffraction pattern measured there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from scipy.special import erf

JITTER = 1e-6
"""Added to the kernel's diagonal (relative to the output scale) before the Cholesky factorisation."""


@dataclass
class GPState:
    """An exact GP with an ARD RBF kernel, conditioned on training embeddings (standardised targets).

    ``k(z, z') = outputscale * exp(-|(z - z') / lengthscale|^2 / 2)``; targets are ``(y - y_mean) / y_std``;
    constant prior mean ``mean``; Gaussian noise variance ``noise`` (standardised units).

    Attributes
    ----------
    z : ndarray, shape (n, d), float64
        Training embeddings.
    y : ndarray, shape (n,), float64
        Standardised training targets.
    lengthscale : ndarray, shape (d,), float64
    outputscale, noise, mean : float
    y_mean, y_std : float
        Standardisation of the targets (original units).
    """

    z: np.ndarray
    y: np.ndarray
    lengthscale: np.ndarray
    outputscale: float
    noise: float
    mean: float
    y_mean: float = 0.0
    y_std: float = 1.0

    def __post_init__(self) -> None:
        self.z = np.asarray(self.z, np.float64).reshape(len(self.y), -1)
        self.y = np.asarray(self.y, np.float64)
        self.lengthscale = np.asarray(self.lengthscale, np.float64).ravel()
        if self.z.shape[1] != len(self.lengthscale):
            raise ValueError(f"embedding width {self.z.shape[1]} != {len(self.lengthscale)} lengthscales")
        self._factor()

    def _factor(self) -> None:
        k = self.kernel(self.z, self.z)
        k[np.diag_indices_from(k)] += self.noise + JITTER * self.outputscale
        self._chol = np.linalg.cholesky(k)
        self._alpha = cho_solve((self._chol, True), self.y - self.mean)

    def kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Kernel matrix between embeddings ``a`` (n, d) and ``b`` (m, d): (n, m) float64."""
        a = np.asarray(a, np.float64) / self.lengthscale
        b = np.asarray(b, np.float64) / self.lengthscale
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return self.outputscale * np.exp(-0.5 * np.maximum(d2, 0.0))

    def predict(self, z: np.ndarray, original_units: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the latent function at embeddings ``z`` (m, d).

        Parameters
        ----------
        original_units : bool
            Undo the target standardisation (else standardised units).

        Returns
        -------
        mean, std : ndarray, shape (m,), float64
        """
        ks = self.kernel(z, self.z)
        mu = self.mean + ks @ self._alpha
        v = solve_triangular(self._chol, ks.T, lower=True)
        var = np.maximum(self.outputscale - (v * v).sum(0), 1e-12)
        sd = np.sqrt(var)
        if original_units:
            return mu * self.y_std + self.y_mean, sd * self.y_std
        return mu, sd

    def condition(self, z_new: np.ndarray, y_new: np.ndarray) -> GPState:
        """The same GP with extra observations (standardised units), e.g. fantasies; hyperparameters kept."""
        return GPState(np.concatenate([self.z, np.asarray(z_new, np.float64).reshape(-1, self.z.shape[1])]),
                       np.concatenate([self.y, np.asarray(y_new, np.float64).ravel()]), self.lengthscale,
                       self.outputscale, self.noise, self.mean, self.y_mean, self.y_std)

    def save(self, path: str | Path) -> Path:
        """Write the state as ``.npz`` (arrays and hyperparameters); returns the path."""
        path = Path(path)
        np.savez(path, z=self.z, y=self.y, lengthscale=self.lengthscale,
                 scalars=np.array([self.outputscale, self.noise, self.mean, self.y_mean, self.y_std]))
        return path

    @classmethod
    def load(cls, path: str | Path) -> GPState:
        """Read a state written by :meth:`save`."""
        with np.load(path) as f:
            o, n, m, ym, ys = (float(v) for v in f["scalars"])
            return cls(f["z"], f["y"], f["lengthscale"], o, n, m, ym, ys)


# --- acquisition -----------------------------------------------------------------------------------------------


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + erf(z / math.sqrt(2.0)))


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float, xi: float = 0.01) -> np.ndarray:
    """Expected improvement over ``best`` (same units as ``mean``), ``xi`` a margin; (m,) float64 >= 0."""
    sd = np.maximum(np.asarray(std, np.float64), 1e-12)
    imp = np.asarray(mean, np.float64) - best - xi
    z = imp / sd
    return np.maximum(imp * _Phi(z) + sd * _phi(z), 0.0)


def upper_confidence_bound(mean: np.ndarray, std: np.ndarray, beta: float = 4.0) -> np.ndarray:
    """``mean + sqrt(beta) * std``; (m,) float64."""
    return np.asarray(mean, np.float64) + math.sqrt(beta) * np.asarray(std, np.float64)


def max_variance(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Posterior variance ``std^2``; (m,) float64."""
    return np.asarray(std, np.float64) ** 2


ACQUISITIONS: dict[str, str] = {"ei": "expected improvement", "ucb": "upper confidence bound",
                                "maxvar": "maximum variance"}
"""Acquisition functions by name (:func:`acquisition_values`)."""


def acquisition_values(name: str, mean: np.ndarray, std: np.ndarray, best: float, *, beta: float = 4.0,
                       xi: float = 0.01) -> np.ndarray:
    """Values of acquisition ``name`` (:data:`ACQUISITIONS`) for a posterior to be maximised.

    Raises ``KeyError`` for an unknown name.
    """
    if name == "ei":
        return expected_improvement(mean, std, best, xi)
    if name == "ucb":
        return upper_confidence_bound(mean, std, beta)
    if name == "maxvar":
        return max_variance(mean, std)
    raise KeyError(f"unknown acquisition {name!r}; known: {', '.join(ACQUISITIONS)}")


def select_batch(state: GPState, z: np.ndarray, available: np.ndarray, k: int, *, acquisition: str = "ei",
                 batch: str = "fantasy", positions: np.ndarray | None = None, exclusion: float = 0.0,
                 beta: float = 4.0, xi: float = 0.01) -> np.ndarray:
    """Choose ``k`` candidates to measure next (all in standardised units, the objective maximised).

    Parameters
    ----------
    state : GPState
        The posterior (its ``y`` standardised; the best observation is ``state.y.max()``).
    z : ndarray, shape (m, d)
        Embeddings of all candidates.
    available : ndarray, shape (m,), bool
        Candidates not yet measured.
    k : int
        Batch size (at most the available candidates).
    acquisition : str
        Name in :data:`ACQUISITIONS`.
    batch : {"fantasy", "exclusion"}
        Greedy with fantasised observations at the posterior mean, or the top ``k`` at least
        ``exclusion`` apart in ``positions``.
    positions : ndarray, shape (m, 2), optional
        Candidate positions (e.g. pixels), for ``exclusion``.
    exclusion : float
        Least distance between the points of one batch (``exclusion`` batches), units of ``positions``.

    Returns
    -------
    ndarray, shape (<= k,), int64
        Candidate indices in the order chosen.

    Raises
    ------
    ValueError
        Unknown ``batch``, or ``exclusion`` batches without positions.
    """
    avail = np.asarray(available, bool).copy()
    k = int(min(k, avail.sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    best = float(state.y.max()) if len(state.y) else 0.0
    chosen: list[int] = []
    if batch == "fantasy":
        st = state
        for _ in range(k):
            mu, sd = st.predict(z, original_units=False)
            a = acquisition_values(acquisition, mu, sd, best, beta=beta, xi=xi)
            a[~avail] = -np.inf
            i = int(np.argmax(a))
            chosen.append(i)
            avail[i] = False
            st = st.condition(z[i:i + 1], mu[i:i + 1])  # kriging believer: observe the prediction
        return np.asarray(chosen, np.int64)
    if batch != "exclusion":
        raise ValueError(f"batch must be fantasy or exclusion, got {batch!r}")
    if positions is None and exclusion > 0:
        raise ValueError("exclusion batches need the candidates' positions")
    mu, sd = state.predict(z, original_units=False)
    a = acquisition_values(acquisition, mu, sd, best, beta=beta, xi=xi)
    a[~avail] = -np.inf
    for i in np.argsort(-a, kind="stable"):
        if not np.isfinite(a[i]):
            break
        if exclusion > 0 and chosen:
            d = np.hypot(*(np.asarray(positions)[chosen] - np.asarray(positions)[i]).T)
            if (d < exclusion).any():
                continue
        chosen.append(int(i))
        if len(chosen) == k:
            break
    return np.asarray(chosen, np.int64)


# --- serving the exported embedding -------------------------------------------------------------------------


class OnnxPredictor:
    """A DKL model as the service runs it: the patch encoder in ONNX Runtime, the posterior in numpy.

    Parameters
    ----------
    encoder : str or Path
        ONNX file of the patch encoder (:meth:`beamloop.edge.experiments.dkl_model.DKLModel.export`):
        input ``patches`` (n, rows, cols) float32, output ``embedding`` (n, d) float32.
    state : GPState or str or Path
        The posterior, or a ``.npz`` of one (:meth:`GPState.save`).
    threads : int
        ONNX Runtime intra-op threads.
    """

    def __init__(self, encoder: str | Path, state: GPState | str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(encoder), opts, providers=["CPUExecutionProvider"])
        self.state = state if isinstance(state, GPState) else GPState.load(state)
        self._input = self.session.get_inputs()[0].name

    def embed(self, patches: np.ndarray) -> np.ndarray:
        """Embeddings (n, d) float32 of patches (n, rows, cols)."""
        return self.session.run(None, {self._input: np.ascontiguousarray(patches, np.float32)})[0]

    def predict(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (n,), original units, at the patches."""
        return self.state.predict(self.embed(patches))


def top_share_found(truth: np.ndarray, measured: np.ndarray, fraction: float = 0.05, maximize: bool = True) -> float:
    """Share of the top ``fraction`` of candidates (by ``truth``; ``ceil(fraction * m)`` of them) among
    ``measured`` (candidate indices). In [0, 1]."""
    t = np.asarray(truth, np.float64)
    n_top = max(1, int(math.ceil(fraction * len(t))))
    order = np.argsort(-t if maximize else t, kind="stable")
    top = set(order[:n_top].tolist())
    return len(top & set(np.asarray(measured, np.int64).tolist())) / n_top


def reconstruction_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square error of a predicted property map against the truth, relative to the truth's standard
    deviation (0: perfect; 1: no better than predicting the mean)."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(truth, np.float64)
    ok = np.isfinite(p) & np.isfinite(t)
    sd = float(t[ok].std())
    return float(np.sqrt(np.mean((p[ok] - t[ok]) ** 2)) / sd) if sd > 0 else float("nan")


Objective = Callable[[np.ndarray], np.ndarray]
