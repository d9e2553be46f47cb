"""The training half of deep kernel learning: image patches -> a small network -> an exact Gaussian process,
fitted jointly with gpytorch (needs the ``dkl`` extra: torch and gpytorch).

The model (A. G. Wilson et al., "Deep Kernel Learning", AISTATS 2016; the DKL of gpytorch's examples):

- **input**: a patch of the frame around each candidate, ``(rows, cols)`` float32 (counts, scaled by the
  patches' global mean and standard deviation);
- **encoder**: a fixed linear projection onto the first ``pca_components`` principal components of *all*
  candidate patches (unlabelled: every candidate's patch is known before anything is measured, so this
  part learns from the whole frame; not whitened, scaled to a typical norm of 1), then
  ``embedding = W f + MLP(f)``: a linear map ``W`` initialised to the first ``embed_dim`` coordinates and
  an MLP ``pca -> hidden... -> embed_dim`` (tanh hidden layers) whose last layer starts at zero. Before
  any training the GP therefore works on the leading principal coordinates, where a patch unlike the
  others (a vacancy, a boundary) lies far from the crowd and keeps a large posterior variance; training
  bends the embedding towards what the measurements say;
- **GP**: constant mean, ``ScaleKernel(RBFKernel(ard_num_dims=embed_dim))`` (lengthscales at least
  ``lengthscale_min``), Gaussian likelihood (noise variance in ``[noise_min, noise_max]``), on
  standardised targets;
- **training**: Adam on the network's weights and the GP's hyperparameters together, maximising the exact
  marginal log likelihood on the acquired (patch, scalar) pairs; each update starts from the last fit
  (``iterations_update`` steps), the first from scratch (``iterations_first``).

Prediction and acquisition use :class:`beamloop.edge.experiments.dkl_gp.GPState` (numpy), built from the
fitted hyperparameters and the training embeddings; :meth:`DKLModel.export` writes the encoder as ONNX
for :class:`beamloop.edge.experiments.dkl_gp.OnnxPredictor`.

Compared with gpax's variational DKL (``gpax.viDKL``: JAX/NumPyro, the encoder's weights inferred by
stochastic variational inference, 4-40 s per decision on 2 CPUs), this is a point estimate of the weights
and an exact GP on at most a few hundred points: well under a second per decision.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from beamloop.edge.experiments.dkl_gp import GPState

DKL_EXTRA = "pip install 'beamloop[dkl]'"


def dkl_missing() -> str | None:
    """None when torch and gpytorch can be imported, else one line saying what to install."""
    missing = [m for m in ("torch", "gpytorch") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"deep kernel learning needs the dkl extra ({DKL_EXTRA}): {' and '.join(missing)} not installed"


class DKLUnavailable(RuntimeError):
    """torch or gpytorch is not installed (the message says what to install)."""


def require_dkl() -> None:
    """Raise :class:`DKLUnavailable` with the one-line reason when the extra is missing."""
    why = dkl_missing()
    if why:
        raise DKLUnavailable(why)


@dataclass(frozen=True)
class DKLConfig:
    """Settings of the DKL model.

    Attributes
    ----------
    embed_dim : int
        Embedding width ``d`` (at most ``pca_components``).
    pca_components : int
        Principal components of the patches that the MLP reads.
    hidden : tuple of int
        Hidden layer widths of the MLP.
    lr : float
        Adam learning rate.
    iterations_first, iterations_update : int
        Adam steps of the first fit and of each later update (warm-started).
    weight_decay : float
        L2 penalty on the MLP's weights (Adam's ``weight_decay``).
    noise_min, noise_max : float
        Range of the likelihood's noise variance (standardised units). At 1 the fit may explain measurements
        that all look alike as noise around a smooth function (a mean map, not one that chases the noise).
    lengthscale_min : float
        Least RBF lengthscale in the embedding (the PCA coordinates are scaled to a typical norm of 1).
    outputscale_min : float
        Least prior variance of the latent function (standardised units). At 1, a patch unlike any measured
        one keeps at least the spread of the values seen so far as its uncertainty, even when the first
        measurements all look alike (standardising them would otherwise scale their noise up to the
        function's variance, and expected improvement would chase that noise).
    seed : int
        Seed of the network's initial weights.
    threads : int
        torch intra-op threads while fitting (the edge machine's cores are shared).
    """

    embed_dim: int = 2
    pca_components: int = 16
    hidden: tuple[int, ...] = (32, 16)
    lr: float = 0.02
    iterations_first: int = 150
    iterations_update: int = 30
    weight_decay: float = 1e-4
    noise_min: float = 1e-3
    noise_max: float = 1.0
    lengthscale_min: float = 0.05
    outputscale_min: float = 1.0
    seed: int = 0
    threads: int = 1


def patch_basis(patches: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Principal components of patches, for the encoder's fixed first layer.

    The projections keep their relative scale (no whitening: the components beyond the first few are mostly
    shot noise, and whitening would give them the weight of the lattice's own variation); they are divided by
    the root-mean-square patch norm about the mean, so that a typical patch lies at distance ~1 from the mean
    patch and one RBF lengthscale range fits every frame.

    Parameters
    ----------
    patches : ndarray, shape (m, rows, cols)
    components : int
        At most ``min(m, rows * cols)``.

    Returns
    -------
    mean : ndarray, shape (rows * cols,), float32
        Mean patch (after scaling).
    basis : ndarray, shape (components, rows * cols), float32
        Components divided by the root-mean-square norm of the centred patches.
    offset, scale : float
        Global scaling of the raw patches: ``(patch - offset) / scale``.
    """
    p = np.asarray(patches, np.float64).reshape(len(patches), -1)
    offset, scale = float(p.mean()), float(p.std()) or 1.0
    x = (p - offset) / scale
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = int(min(components, len(s)))
    rms = float(np.sqrt((s**2).sum() / max(len(p), 1))) or 1.0
    basis = vt[:k] / rms
    return mean.astype(np.float32), basis.astype(np.float32), offset, scale


class DKLModel:
    """Deep kernel learning over the patches of a fixed candidate set.

    Parameters
    ----------
    patches : ndarray, shape (m, rows, cols), real
        The patch at every candidate (counts).
    config : DKLConfig

    Raises
    ------
    DKLUnavailable
        torch or gpytorch is not installed.
    ValueError
        Fewer than two candidates.
    """

    def __init__(self, patches: np.ndarray, config: DKLConfig = DKLConfig()) -> None:
        require_dkl()
        import torch

        if len(patches) < 2 or np.ndim(patches) != 3:
            raise ValueError(f"need patches (m >= 2, rows, cols), got shape {np.shape(patches)}")
        self.config = config
        self.patch_shape = tuple(int(v) for v in np.shape(patches)[1:])
        self._torch = torch
        mean, basis, self.offset, self.scale = patch_basis(patches, config.pca_components)
        # the GP's inputs are flat (n, rows * cols): gpytorch reads leading dimensions beyond two as batches
        # float64 throughout the fit: the exact GP's Cholesky factor of nearly equal embeddings needs it
        self.x_all = torch.as_tensor(np.asarray(patches, np.float64).reshape(len(patches), -1))
        self.encoder = _make_encoder(torch, mean, basis, self.offset, self.scale, config).double()
        self._model: Any = None  # gpytorch's ExactGP, built at the first fit
        self._likelihood: Any = None
        self._optimizer: Any = None
        self.state: GPState | None = None
        self.y_mean, self.y_std = 0.0, 1.0
        self.last_loss = float("nan")

    def fit(self, index: np.ndarray, y: np.ndarray, iterations: int | None = None) -> GPState:
        """Fit network and GP jointly on candidates ``index`` with targets ``y`` (to be maximised).

        Parameters
        ----------
        index : ndarray, shape (n,), int
            Candidate indices of the observations (n >= 2).
        y : ndarray, shape (n,), float
            Their values (non-finite ones are left out).
        iterations : int, optional
            Adam steps; default ``iterations_first`` for the first fit, ``iterations_update`` after.

        Returns
        -------
        GPState
            The posterior in the embedding (also :attr:`state`).
        """
        import gpytorch

        torch = self._torch
        cfg = self.config
        idx = np.asarray(index, np.int64)
        y = np.asarray(y, np.float64)
        ok = np.isfinite(y)
        idx, y = idx[ok], y[ok]
        if len(idx) < 2:
            raise ValueError("need at least two finite observations to fit")
        self.y_mean = float(y.mean())
        self.y_std = float(y.std()) or 1.0
        yt = torch.as_tensor((y - self.y_mean) / self.y_std, dtype=torch.float64)
        xt = self.x_all[torch.as_tensor(idx)]
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            first = self._model is None
            if first:
                torch.manual_seed(cfg.seed)
                lik = gpytorch.likelihoods.GaussianLikelihood(
                    noise_constraint=gpytorch.constraints.Interval(cfg.noise_min, cfg.noise_max)).double()
                self._model = _ExactDKL(xt, yt, lik, self.encoder, cfg.embed_dim, cfg.lengthscale_min,
                                        cfg.outputscale_min, gpytorch).double()
                self._likelihood = lik
                self._optimizer = torch.optim.Adam([
                    {"params": [p for p in self.encoder.parameters() if p.requires_grad],
                     "weight_decay": cfg.weight_decay},
                    {"params": list(self._model.covar_module.parameters())
                     + list(self._model.mean_module.parameters()) + list(lik.parameters())}], lr=cfg.lr)
            else:
                self._model.set_train_data(xt, yt, strict=False)
            model, lik = self._model, self._likelihood
            steps = iterations if iterations is not None else (cfg.iterations_first if first else cfg.iterations_update)
            mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
            model.train()
            lik.train()
            with gpytorch.settings.cholesky_jitter(1e-5):
                for _ in range(int(steps)):
                    self._optimizer.zero_grad()
                    loss = -mll(model(xt), yt)
                    loss.backward()
                    self._optimizer.step()
            self.last_loss = float(loss.detach()) if steps else float("nan")
            model.eval()
            lik.eval()
            with torch.no_grad():
                z = self.encoder(xt).double().numpy()
            self.state = GPState(z, (y - self.y_mean) / self.y_std, self.lengthscale, self.outputscale,
                                 self.noise, float(model.mean_module.constant.detach()), self.y_mean, self.y_std)
        finally:
            torch.set_num_threads(threads)
        return self.state

    @property
    def lengthscale(self) -> np.ndarray:
        """The RBF kernel's lengthscales (d,), in the embedding."""
        assert self._model is not None
        return self._model.covar_module.base_kernel.lengthscale.detach().double().numpy().ravel()

    @property
    def outputscale(self) -> float:
        """The kernel's output scale (standardised units)."""
        assert self._model is not None
        return float(self._model.covar_module.outputscale.detach())

    @property
    def noise(self) -> float:
        """The likelihood's noise variance (standardised units)."""
        assert self._likelihood is not None
        return float(self._likelihood.noise.detach())

    def embed(self, index: np.ndarray | None = None) -> np.ndarray:
        """Embeddings (n, d) float64 of the candidates ``index`` (default all)."""
        torch = self._torch
        x = self.x_all if index is None else self.x_all[torch.as_tensor(np.asarray(index, np.int64))]
        with torch.no_grad():
            return self.encoder(x).double().numpy()

    def predict(self, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation (original units) at candidates ``index`` (default all).

        Raises ``RuntimeError`` before the first :meth:`fit`."""
        if self.state is None:
            raise RuntimeError("predict() before fit()")
        return self.state.predict(self.embed(index))

    def gpytorch_predict(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same posterior computed by gpytorch (for checking :class:`GPState` against it)."""
        import gpytorch

        torch = self._torch
        assert self._model is not None
        x = self.x_all[torch.as_tensor(np.asarray(index, np.int64))]
        with torch.no_grad(), gpytorch.settings.fast_pred_var(False), gpytorch.settings.cholesky_jitter(1e-5):
            f = self._model(x)
            return (f.mean.double().numpy() * self.y_std + self.y_mean,
                    f.variance.clamp_min(0).sqrt().double().numpy() * self.y_std)

    def export(self, path: str | Path) -> Path:
        """Write the patch encoder as ONNX: input ``patches`` (n, rows, cols) float32 (raw counts), output
        ``embedding`` (n, d) float32; dynamic batch size. Returns the path."""
        torch = self._torch
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dummy = self.x_all[:2].reshape(2, *self.patch_shape).float()
        encoder = copy.deepcopy(self.encoder).float().eval()
        torch.onnx.export(encoder, (dummy,), str(path), input_names=["patches"], output_names=["embedding"],
                          dynamic_axes={"patches": {0: "n"}, "embedding": {0: "n"}}, opset_version=17,
                          dynamo=False)
        return path


def _make_encoder(torch, mean: np.ndarray, basis: np.ndarray, offset: float, scale: float, cfg: DKLConfig):
    """``patches (n, rows, cols) -> (n, embed_dim)``: scaling and PCA fixed, the MLP trained."""
    nn = torch.nn

    class Encoder(nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))
            self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
            self.register_buffer("mean", torch.as_tensor(mean))
            self.register_buffer("basis", torch.as_tensor(basis).T.contiguous())
            k = basis.shape[0]
            self.skip = nn.Linear(k, cfg.embed_dim, bias=False)
            with torch.no_grad():
                self.skip.weight.copy_(torch.eye(cfg.embed_dim, k))
            layers, width = [], k
            for h in cfg.hidden:
                layers += [nn.Linear(width, h), nn.Tanh()]
                width = h
            last = nn.Linear(width, cfg.embed_dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.mlp = nn.Sequential(*layers, last)

        def forward(self, patches):
            x = (patches.flatten(1) - self.offset) / self.scale
            f = (x - self.mean) @ self.basis
            return self.skip(f) + self.mlp(f)

    torch.manual_seed(cfg.seed)
    return Encoder()


def _exact_dkl_class(gpytorch):
    class ExactDKL(gpytorch.models.ExactGP):  # type: ignore[name-defined]
        def __init__(self, x, y, likelihood, encoder, dim, lengthscale_min, outputscale_min):
            super().__init__(x, y, likelihood)
            self.encoder = encoder
            self.mean_module = gpytorch.means.ConstantMean()
            rbf = gpytorch.kernels.RBFKernel(ard_num_dims=dim,
                                             lengthscale_constraint=gpytorch.constraints.GreaterThan(lengthscale_min))
            rbf.lengthscale = max(0.5, 2 * lengthscale_min)
            self.covar_module = gpytorch.kernels.ScaleKernel(
                rbf, outputscale_constraint=gpytorch.constraints.GreaterThan(outputscale_min))
            self.covar_module.outputscale = max(1.0, 2 * outputscale_min)

        def forward(self, x):
            z = self.encoder(x)
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    return ExactDKL


def _ExactDKL(x, y, likelihood, encoder, dim, lengthscale_min, outputscale_min, gpytorch):  # noqa: N802 - a factory
    return _exact_dkl_class(gpytorch)(x, y, likelihood, encoder, dim, lengthscale_min, outputscale_min)
