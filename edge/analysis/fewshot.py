"""Few-shot chip classification: tile a frame into chips, embed them, classify by prototypes of a few examples.

A frame is cut into square chips (:func:`tile`), each resized to the encoder's input (32 x 32 pixels) and
embedded by a small convolutional network shipped as ONNX (``edge/models/fewshot/encoder.onnx``, trained by
:mod:`beamloop.edge.learn.fewshot_train` on simulated chips; run with ONNX Runtime). A
:class:`PrototypeClassifier` holds one prototype per class, the mean embedding of its 1-5 support chips, and
gives every chip the softmax over negative squared Euclidean distances to the prototypes: the prototypical
network of J. Snell, K. Swersky & R. Zemel, "Prototypical networks for few-shot learning", NeurIPS 2017.
New classes need new support chips only, never retraining: the few-shot chip workflow of K. Akers et al.,
"Rapid and flexible segmentation of electron microscopy data using few-shot machine learning", npj Comput.
Mater. 7, 187 (2021), and its GUI (C. Doty et al., Comput. Mater. Sci. 203, 111121 (2022)).

Support sets are JSON (:class:`SupportSet`): the chip size, and per class a list of chips given by their
top-left pixel ``[row, col]`` in a named image.

Intensities: each frame is scaled once by its 1st and 99th percentiles (:func:`normalize_frame`) before
tiling, the same in training and inference.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "fewshot"
"""Where the shipped encoder and its manifest live."""

INPUT_PX = 32
"""Side of the encoder's input chip, pixels."""


class FewShotError(ValueError):
    """A support set, chip size, image or encoder that cannot be used (one line naming what is wrong)."""


def normalize_frame(image: np.ndarray) -> np.ndarray:
    """Scale a frame by its 1st and 99th percentiles: ``(x - p1) / (p99 - p1)``, float32.

    Parameters
    ----------
    image : ndarray, shape (rows, cols), any real dtype

    Returns
    -------
    ndarray, shape (rows, cols), float32

    Raises
    ------
    FewShotError
        Not a 2D array, or values that are not finite.
    """
    a = np.asarray(image)
    if a.ndim != 2 or a.size == 0:
        raise FewShotError(f"image must be a non-empty 2D array, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise FewShotError("image has values that are not finite")
    lo, hi = np.percentile(a, [1.0, 99.0])
    return ((a - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)


def tile(image: np.ndarray, chip_px: int, *, normalized: bool = False) -> np.ndarray:
    """Chips of a frame, resized to :data:`INPUT_PX` square, in row-major order of the chip grid.

    The frame is cropped to whole chips (the remainder at the bottom and right is dropped), scaled by
    :func:`normalize_frame` (unless ``normalized``), resized once by ``INPUT_PX / chip_px`` (linear
    interpolation; block means when ``chip_px`` is a multiple of :data:`INPUT_PX`), and cut.

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
    chip_px : int
        Chip side in frame pixels (>= 8, at most the frame's smaller side).
    normalized : bool
        The image is already scaled.

    Returns
    -------
    ndarray, shape (n_rows, n_cols, INPUT_PX, INPUT_PX), float32
        ``n_rows = rows // chip_px``, ``n_cols = cols // chip_px``.

    Raises
    ------
    FewShotError
        ``chip_px`` not a whole number in [8, min(rows, cols)], or a bad image.
    """
    a = np.asarray(image) if normalized else normalize_frame(image)
    if a.ndim != 2:
        raise FewShotError(f"image must be 2D, got shape {a.shape}")
    if not (isinstance(chip_px, (int, np.integer)) and 8 <= chip_px <= min(a.shape)):
        raise FewShotError(f"chip size {chip_px!r} px must be a whole number in [8, {min(a.shape)}] for a frame of "
                           f"{a.shape[0]} x {a.shape[1]}")
    nr, nc = a.shape[0] // chip_px, a.shape[1] // chip_px
    a = a[:nr * chip_px, :nc * chip_px].astype(np.float32, copy=False)
    if chip_px == INPUT_PX:
        small = a
    elif chip_px % INPUT_PX == 0:
        k = chip_px // INPUT_PX
        small = a.reshape(nr * INPUT_PX, k, nc * INPUT_PX, k).mean(axis=(1, 3))
    else:
        small = ndimage.zoom(a, (nr * INPUT_PX / a.shape[0], nc * INPUT_PX / a.shape[1]), order=1, grid_mode=True,
                             mode="nearest")
    return np.ascontiguousarray(small.reshape(nr, INPUT_PX, nc, INPUT_PX).transpose(0, 2, 1, 3))


def chip_at(image: np.ndarray, row: int, col: int, chip_px: int) -> np.ndarray:
    """One chip with top-left pixel ``(row, col)``, scaled with the whole frame, resized to :data:`INPUT_PX`.

    Returns
    -------
    ndarray, shape (INPUT_PX, INPUT_PX), float32

    Raises
    ------
    FewShotError
        The chip does not lie inside the frame.
    """
    a = normalize_frame(image)
    if not (0 <= row and 0 <= col and row + chip_px <= a.shape[0] and col + chip_px <= a.shape[1]):
        raise FewShotError(f"chip at row {row}, col {col} of {chip_px} px does not lie inside the "
                           f"{a.shape[0]} x {a.shape[1]} frame")
    return tile(a[row:row + chip_px, col:col + chip_px], chip_px, normalized=True)[0, 0]


def chip_px_for_scale(lattice_px: float, cells: float = 6.0) -> int:
    """A chip side covering ``cells`` lattice spacings of ``lattice_px`` pixels, rounded to a multiple of 8.

    Raises
    ------
    FewShotError
        ``lattice_px`` not a positive finite number.
    """
    if not (isinstance(lattice_px, (int, float)) and math.isfinite(lattice_px) and lattice_px > 0):
        raise FewShotError(f"lattice scale {lattice_px!r} px must be a positive number")
    return max(8, int(round(lattice_px * cells / 8)) * 8)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ChipEncoder:
    """The shipped chip encoder, run with ONNX Runtime on the CPU.

    Parameters
    ----------
    path : str or Path, optional
        An ONNX model with input ``chips`` (n, 1, 32, 32) float32 and output ``embedding`` (n, d) float32;
        default ``encoder.onnx`` of :data:`MODEL_DIR`, checked against the SHA-256 in its manifest.
    threads : int
        ONNX Runtime intra-op threads.

    Attributes
    ----------
    dim : int
        Embedding size ``d``.
    manifest : dict
        The manifest (training data, configuration, metrics, hash); empty for a model given by path alone.

    Raises
    ------
    FewShotError
        The model is missing, or its hash differs from the manifest's.
    """

    def __init__(self, path: str | Path | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        self.manifest: dict = {}
        if path is None:
            path = MODEL_DIR / "encoder.onnx"
            mpath = MODEL_DIR / "manifest.json"
            if not path.is_file() or not mpath.is_file():
                raise FewShotError(f"no few-shot encoder at {path}: train one with `beamloop fewshot train`")
            self.manifest = json.loads(mpath.read_text())
            want = self.manifest.get("sha256", "")
            got = sha256_file(path)
            if want and want != got:
                raise FewShotError(f"few-shot encoder {path} has SHA-256 {got[:12]}..., its manifest says "
                                   f"{want[:12]}...")
        path = Path(path)
        if not path.is_file():
            raise FewShotError(f"no few-shot encoder at {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.path = path

    def embed(self, chips: np.ndarray, batch: int = 512) -> np.ndarray:
        """Embeddings of chips.

        Parameters
        ----------
        chips : ndarray, shape (..., 32, 32), float32
            Scaled chips (:func:`tile`).
        batch : int
            Chips per ONNX Runtime call.

        Returns
        -------
        ndarray, shape (..., d), float32

        Raises
        ------
        FewShotError
            Chips of another size.
        """
        c = np.asarray(chips, np.float32)
        if c.shape[-2:] != (INPUT_PX, INPUT_PX):
            raise FewShotError(f"chips must be {INPUT_PX} x {INPUT_PX}, got {c.shape[-2:]}")
        lead = c.shape[:-2]
        flat = np.ascontiguousarray(c.reshape(-1, 1, INPUT_PX, INPUT_PX))
        out = np.empty((flat.shape[0], self.dim), np.float32)
        for i in range(0, flat.shape[0], batch):
            out[i:i + batch] = self.session.run(None, {self._input: flat[i:i + batch]})[0]
        return out.reshape(*lead, self.dim)


class PrototypeClassifier:
    """Prototypical-network classification (Snell et al. 2017) of chip embeddings.

    Parameters
    ----------
    embeddings : ndarray, shape (n, d), float32
        Support chips' embeddings.
    labels : sequence of str, length n
        Their classes (each class at least one chip).

    Attributes
    ----------
    classes : tuple of str
        Sorted by first appearance.
    prototypes : ndarray, shape (k, d), float32
        Mean embedding per class.

    Raises
    ------
    FewShotError
        No chips, a length mismatch, or fewer than two classes.
    """

    def __init__(self, embeddings: np.ndarray, labels) -> None:
        e = np.asarray(embeddings, np.float32)
        labels = [str(v) for v in labels]
        if e.ndim != 2 or e.shape[0] == 0 or e.shape[0] != len(labels):
            raise FewShotError(f"support needs n embeddings (n, d) and n labels; got {e.shape} and {len(labels)}")
        self.classes = tuple(dict.fromkeys(labels))
        if len(self.classes) < 2:
            raise FewShotError(f"support needs at least two classes, got {list(self.classes)}")
        idx = np.array([self.classes.index(v) for v in labels])
        self.prototypes = np.stack([e[idx == k].mean(axis=0) for k in range(len(self.classes))]).astype(np.float32)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """Softmax over negative squared Euclidean distances to the prototypes.

        Parameters
        ----------
        embeddings : ndarray, shape (..., d)

        Returns
        -------
        ndarray, shape (..., k), float32
            Probabilities in class order :attr:`classes`.
        """
        e = np.asarray(embeddings, np.float32)
        d2 = ((e[..., None, :] - self.prototypes) ** 2).sum(axis=-1)
        z = -d2 + d2.min(axis=-1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class index (in :attr:`classes`) and its probability per embedding.

        Returns
        -------
        labels : ndarray, shape (...,), int64
        confidence : ndarray, shape (...,), float32
        """
        p = self.predict_proba(embeddings)
        k = p.argmax(axis=-1)
        return k, np.take_along_axis(p, k[..., None], axis=-1)[..., 0]


@dataclass
class SupportSet:
    """Support chips chosen by a person: the chip size and, per class, chips in named images.

    Attributes
    ----------
    chip_px : int
        Chip side, pixels of the images.
    chips : dict str -> list of (image, row, col)
        Per class, the chips' image (a path or a name) and top-left pixel.
    """

    chip_px: int
    chips: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)

    def add(self, cls: str, image: str, row: int, col: int) -> None:
        """Add one chip of class ``cls``."""
        self.chips.setdefault(str(cls), []).append((str(image), int(row), int(col)))

    def to_json(self) -> str:
        """JSON text: ``{"chip_px": n, "classes": {name: [{"image", "row", "col"}, ...]}}``."""
        return json.dumps({"chip_px": self.chip_px, "classes": {
            k: [{"image": i, "row": r, "col": c} for i, r, c in v] for k, v in self.chips.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SupportSet:
        """Inverse of :meth:`to_json`.

        Raises
        ------
        FewShotError
            Not that layout, a class without chips, or fewer than two classes.
        """
        try:
            d = json.loads(text)
            s = cls(int(d["chip_px"]))
            for name, items in d["classes"].items():
                if not items:
                    raise FewShotError(f"support class {name!r} has no chips")
                for it in items:
                    s.add(name, it["image"], it["row"], it["col"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, FewShotError):
                raise
            raise FewShotError(f"support set is not {{chip_px, classes: {{name: [{{image, row, col}}]}}}}: {exc}") \
                from None
        if len(s.chips) < 2:
            raise FewShotError(f"support set needs at least two classes, got {list(s.chips)}")
        return s

    def embed(self, encoder: ChipEncoder, images: dict[str, np.ndarray]) -> PrototypeClassifier:
        """Embed the support chips and build the classifier.

        Parameters
        ----------
        encoder : ChipEncoder
        images : dict str -> ndarray (rows, cols)
            The images the chips name.

        Raises
        ------
        FewShotError
            A chip names an image not given, or lies outside it.
        """
        chips, labels = [], []
        for name, items in self.chips.items():
            for img, r, c in items:
                if img not in images:
                    raise FewShotError(f"support chip of class {name!r} names image {img!r}, which was not loaded")
                chips.append(chip_at(images[img], r, c, self.chip_px))
                labels.append(name)
        return PrototypeClassifier(encoder.embed(np.stack(chips)), labels)


@dataclass
class ChipMap:
    """The chip classification of one frame.

    Attributes
    ----------
    labels : ndarray, shape (n_rows, n_cols), int64
        Class index per chip (in ``classes``).
    confidence : ndarray, shape (n_rows, n_cols), float32
        Its probability.
    proba : ndarray, shape (n_rows, n_cols, k), float32
    classes : tuple of str
    chip_px : int
    """

    labels: np.ndarray
    confidence: np.ndarray
    proba: np.ndarray
    classes: tuple[str, ...]
    chip_px: int

    def stats(self) -> dict:
        """Per class: chips, area fraction, mean confidence."""
        n = self.labels.size
        out = {}
        for k, name in enumerate(self.classes):
            m = self.labels == k
            out[name] = {"chips": int(m.sum()), "fraction": float(m.sum() / max(n, 1)),
                         "mean_confidence": float(self.confidence[m].mean()) if m.any() else 0.0}
        return out

    def rows(self) -> list[dict]:
        """One dict per chip: ``row``, ``col`` (top-left pixel), ``class``, ``confidence`` and each class's
        probability."""
        out = []
        for i in range(self.labels.shape[0]):
            for j in range(self.labels.shape[1]):
                k = int(self.labels[i, j])
                row = {"row": i * self.chip_px, "col": j * self.chip_px, "class": self.classes[k],
                       "confidence": float(self.confidence[i, j])}
                row.update({f"p_{c}": float(self.proba[i, j, q]) for q, c in enumerate(self.classes)})
                out.append(row)
        return out


def classify_frame(image: np.ndarray, classifier: PrototypeClassifier, encoder: ChipEncoder,
                   chip_px: int) -> ChipMap:
    """Tile, embed and classify one frame.

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
    classifier : PrototypeClassifier
    encoder : ChipEncoder
    chip_px : int

    Returns
    -------
    ChipMap

    Raises
    ------
    FewShotError
        As :func:`tile`.
    """
    chips = tile(image, chip_px)
    emb = encoder.embed(chips)
    p = classifier.predict_proba(emb)
    k = p.argmax(axis=-1)
    return ChipMap(k, np.take_along_axis(p, k[..., None], axis=-1)[..., 0], p, classifier.classes, chip_px)
