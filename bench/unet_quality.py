"""Benchmark: accuracy of the shipped U-Net ensemble, its uncertainty, and its behaviour on real images.

1. Held-out simulated frames (:mod:`beamloop.edge.learn.evaluate`): recall / precision / RMS of each precision and of
   the
   classical finder, per set (MoS2 at 1e3-1e6 e-/A^2; other structures, two never trained on).
2. Uncertainty against error: on held-out MoS2 frames at low dose (1e3, 3e3, 1e4 e-/A^2), each found column is
   "right" (matched to a true column within 0.5 A, with the right class) or "wrong" (no true column, or the
   wrong class); the figure compares their per-column uncertainty (histograms and the ROC of uncertainty as a
   detector of wrong columns).
3. Real images (../shared/data/real): classical and U-Net side by side, with the U-Net's per-pixel uncertainty.
   The MIT images' figures go to ``bench/results/``; the GPL perovskite's only to ``out/unet_real/`` (never
   into the product), and its numbers to the JSON.

Writes ``bench/results/unet_quality.json``, ``unet_uncertainty.png``, ``unet_real_<name>.png``.
Run: ``python -m beamloop.bench.unet_quality [--quick]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
PRIVATE = Path(__file__).resolve().parents[1] / "out" / "unet_real"


def uncertainty_vs_error(finder, doses=(1e3, 3e3, 1e4), n: int = 4) -> dict:
    """Per-column uncertainty of right and wrong columns on held-out MoS2 frames (see the module docstring)."""
    from beamloop.edge.analysis.scoring import match
    from beamloop.edge.sim.frames import mos2_frame

    right, wrong = [], []
    for dose in doses:
        for k in range(n):
            f = mos2_frame(dose_e_per_A2=dose, seed=400_000 + 10 * k + int(np.log10(dose) * 7))
            res = finder.find(f.counts, "MoS2")
            cols = res.columns
            keep = f.truth_cls < 3
            t_xy, t_cls = f.truth_xy[keep], f.truth_cls[keep]
            fi, ti, _ = match(cols.xy, t_xy, 0.5 / f.pixel_size_A)
            ok = np.zeros(len(cols), bool)
            ok[fi] = cols.cls[fi] == t_cls[ti]
            m = 0.5 / f.pixel_size_A  # leave out the edge strip, as the scoring does
            inside = ((cols.x >= m) & (cols.x <= f.counts.shape[1] - 1 - m) & (cols.y >= m)
                      & (cols.y <= f.counts.shape[0] - 1 - m))
            right.append(res.uncertainty[ok & inside])
            wrong.append(res.uncertainty[~ok & inside])
    r, w = np.concatenate(right), np.concatenate(wrong)
    # ROC of "uncertainty above a threshold" as a detector of wrong columns
    thr = np.unique(np.concatenate([r, w, [np.inf]]))[::-1]
    tpr = np.array([(w >= t).mean() if len(w) else np.nan for t in thr])
    fpr = np.array([(r >= t).mean() for t in thr])
    auc = float(np.trapezoid(tpr, fpr)) if len(w) else float("nan")
    return {"right": r, "wrong": w, "fpr": fpr, "tpr": tpr, "auc": auc}


def _plot_uncertainty(u: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    hi = float(np.percentile(np.concatenate([u["right"], u["wrong"]]), 99.5))
    bins = np.linspace(0, max(hi, 1e-3), 40)
    axes[0].hist(u["right"], bins, density=True, alpha=0.6, label=f"right columns ({len(u['right'])})")
    axes[0].hist(u["wrong"], bins, density=True, alpha=0.6, label=f"wrong columns ({len(u['wrong'])})")
    axes[0].set_xlabel("per-column uncertainty")
    axes[0].set_ylabel("density")
    axes[0].legend()
    axes[0].set_title("held-out MoS2, 1e3-1e4 e-/A^2")
    axes[1].plot(u["fpr"], u["tpr"])
    axes[1].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[1].set_xlabel("fraction of right columns flagged")
    axes[1].set_ylabel("fraction of wrong columns flagged")
    axes[1].set_title(f"uncertainty as a detector of wrong columns (AUC {u['auc']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def real_images(finder, out_public: Path, out_private: Path) -> dict:
    """Classical and U-Net on each real image; side-by-side figure; counts and uncertainty summaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from beamloop.edge.batch_find import find_columns
    from beamloop.edge.io.imageio import read_image

    out = {}
    for path in sorted(REAL.glob("*")):
        if path.suffix.lower() not in (".png", ".hdf5", ".tif", ".tiff"):
            continue
        img = read_image(path).frames[0].astype(np.float32)
        try:
            ccols, _ = find_columns(img, None, "generic")
            n_classical = len(ccols)
        except ValueError as exc:
            ccols, n_classical = None, f"failed: {exc}"
        res = finder.find(img, "generic")
        u = res.uncertainty
        out[path.name] = {"shape": list(img.shape), "classical_columns": n_classical, "unet_columns": len(res.columns),
                          "unet_threshold": round(res.threshold, 3), "unet_min_distance_px": round(res.min_distance_px,
                                                                                                   2),
                          "unet_uncertainty_median": round(float(np.median(u)), 3) if len(u) else None,
                          "unet_uncertainty_p90": round(float(np.percentile(u, 90)), 3) if len(u) else None,
                          "unet_pixel_std_max": round(float(res.heat_map_std.max()), 3)}
        if ccols is not None and len(ccols) and len(res.columns):
            # no ground truth on real images: U-Net columns that the classical finder also has (within 4 px)
            # against the extra ones, and how uncertain each group is
            from beamloop.edge.analysis.scoring import match

            fi, _, _ = match(res.columns.xy, ccols.xy, 4.0)
            both = np.zeros(len(res.columns), bool)
            both[fi] = True
            out[path.name].update({
                "unet_also_classical": int(both.sum()), "unet_only": int((~both).sum()),
                "classical_only": int(len(ccols) - both.sum()),
                "uncertainty_median_also_classical": round(float(np.median(u[both])), 3) if both.any() else None,
                "uncertainty_median_unet_only": round(float(np.median(u[~both])), 3) if (~both).any() else None})
        lo, hi = np.percentile(img, [0.5, 99.8])
        fig, axes = plt.subplots(1, 3, figsize=(17, 6))
        for ax, cols, title in ((axes[0], ccols, f"classical ({n_classical})"),
                                (axes[1], res.columns, f"U-Net ensemble ({len(res.columns)})")):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if cols is not None and len(cols):
                kw = {"c": u, "cmap": "coolwarm", "vmin": 0, "vmax": 0.6} if cols is res.columns else {"c": "tab:red"}
                ax.scatter(cols.x, cols.y, s=10, edgecolors="none", **kw)
            ax.set_title(title, fontsize=10)
        im = axes[2].imshow(res.heat_map_std, cmap="magma", vmin=0, vmax=max(float(res.heat_map_std.max()), 0.05))
        axes[2].set_title("U-Net per-pixel uncertainty (ensemble std)", fontsize=10)
        fig.colorbar(im, ax=axes[2], fraction=0.046)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{path.name}: U-Net columns coloured by per-column uncertainty (blue low, red high)")
        fig.tight_layout()
        gpl = "atomap" in path.name  # GPL-3.0 data: never into the product tree
        dest = (out_private if gpl else out_public) / f"unet_real_{path.stem}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(dest, dpi=90)
        plt.close(fig)
        out[path.name]["figure"] = str(dest)
    return out


def run(quick: bool = False) -> dict:
    """Run all three parts; returns (and writes) the results dict."""
    from beamloop.edge.learn import evaluate
    from beamloop.edge.stages.unet import PRECISIONS, UNetFinder

    finders = {p: UNetFinder(precision=p, device="cpu") for p in PRECISIONS}
    sets = evaluate.held_out_sets(quick)
    res = {"held_out": {p: evaluate.evaluate(evaluate.unet_find(f), sets) for p, f in finders.items()}}
    res["held_out"]["classical"] = evaluate.evaluate(evaluate.classical_find(), sets)
    u = uncertainty_vs_error(finders["fp32"], n=2 if quick else 4)
    res["uncertainty"] = {"auc": round(u["auc"], 3), "n_right": len(u["right"]), "n_wrong": len(u["wrong"]),
                          "median_right": round(float(np.median(u["right"])), 3),
                          "median_wrong": round(float(np.median(u["wrong"])), 3) if len(u["wrong"]) else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot_uncertainty(u, RESULTS / "unet_uncertainty.png")
    res["real"] = real_images(finders["fp32"], RESULTS, PRIVATE)
    (RESULTS / "unet_quality.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(json.dumps(run(ap.parse_args().quick), indent=1))
