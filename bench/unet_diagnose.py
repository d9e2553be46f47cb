"""Where the U-Net finder's errors come from on held-out simulated MoS2 (diagnosis, not timing).

1. False positives at each dose, with the old fixed extraction (threshold 0.4, 2.5 px) and the shipped
   frame-adaptive one (:class:`beamloop.edge.stages.unet.UNetFinder`), sorted by what lies under them: a second peak of
   a
   column already found ("split", a true column within 0.75 A), a vacancy site, or an empty lattice site
   (MoS2 hexagon centres); and how many lie near the frame edge or near a tile seam (512 x 512 frames).
2. Position error against its floor: the Cramer-Rao bound of the photon noise
   (:func:`beamloop.edge.learn.evaluate.position_error_floor`), an oracle -- both finders on the noise-free rendered
   frame
   (same seeds, same scan distortion) -- and the same without scan distortion; the classical finder at
   1e6 / 1e7 e-/A^2; and which part of the scan distortion (line jitter, 50 Hz wobble, drift) makes that floor.

Writes ``bench/results/unet_diagnose.json``. Run: ``python -m beamloop.bench.unet_diagnose [--frames N]``; about a
minute on 2 idle cores.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from beamloop.edge.analysis.scoring import combine, match, score_frame
from beamloop.edge.sim import frames as simframes
from beamloop.edge.sim.frames import mos2_frame

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 200_000


@contextmanager
def noise_free():
    """Frames rendered without Poisson noise (mean counts, float32); the random stream is consumed as before,
    so a seed gives the same lattice, defects and distortion."""
    orig = simframes.poisson_counts

    def expected(frac, epp, rng, bg=0.0, dtype=None):
        lam = np.maximum((frac + bg) * epp, 0.0)
        rng.poisson(lam)
        return lam.astype(np.float32)

    simframes.poisson_counts = expected
    try:
        yield
    finally:
        simframes.poisson_counts = orig


def _frame_with(seed: int, dose: float, **override):
    """:func:`beamloop.edge.sim.frames.mos2_frame` (256 x 256, 0.15 A/px) with parts of its scan distortion switched off
    (``override`` replaces fields of the typical :class:`beamloop.edge.sim.distortion.ScanDistortion`)."""
    import dataclasses

    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.sim import distortion as dist
    from beamloop.edge.sim import lattice
    from beamloop.edge.sim.frames import FrameSimulator

    rng = np.random.default_rng(seed)
    n, px, margin = 256, 0.15, 8.0
    h = n * px
    rot = float(rng.uniform(0, 60))
    spec = lattice.mos2((-h / 2 - margin, h / 2 + margin, -h / 2 - margin, h / 2 + margin), rotation_deg=rot,
                        origin_A=tuple(rng.uniform(-2, 2, 2)))
    lattice.add_point_defects(spec, rng)
    sim = FrameSimulator(spec, rng)
    scan = ScanFrame(0, (n, n), (h / 10, h / 10), dwell_us=10.0)
    d = dataclasses.replace(dist.ScanDistortion.typical(rng, n * n * 10e-6, 1.0), **override)
    return sim.acquire(scan, dose * px * px, d)


def _score(xy, cls, f, generic=False):
    if generic:
        sel = f.truth_cls < 3
        return score_frame(xy, np.zeros(len(xy), np.int8), f.truth_xy[sel], np.zeros(int(sel.sum()), np.int8),
                           ("column",), f.pixel_size_A, frame_shape=f.counts.shape)
    return score_frame(xy, cls, f.truth_xy, f.truth_cls, f.class_names, f.pixel_size_A, frame_shape=f.counts.shape)


def false_positives(cols, f, seams: list[float]) -> dict:
    """Kinds of the found columns that match no true column (edge strip left out, as the scoring does)."""
    s = f.pixel_size_A
    colm = f.truth_cls < 3
    fi, _, _ = match(cols.xy, f.truth_xy[colm], 0.5 / s)
    ok = np.zeros(len(cols), bool)
    ok[fi] = True
    rows, ncols = f.counts.shape
    x, y = cols.x, cols.y
    edge = np.minimum.reduce([x + 0.5, y + 0.5, ncols - 0.5 - x, rows - 0.5 - y])
    bad = np.flatnonzero(~ok & (edge >= 0.5 / s))
    kinds = {"split": 0, "vacancy_site": 0, "empty_site": 0}
    d_col, _ = cKDTree(f.truth_xy[colm]).query(cols.xy[bad]) if len(bad) else (np.zeros(0), None)
    vac = f.truth_xy[f.truth_cls == 3]
    d_vac = cKDTree(vac).query(cols.xy[bad])[0] if len(vac) and len(bad) else np.full(len(bad), np.inf)
    for dc, dv in zip(d_col, d_vac):
        if dv * s < 0.5:
            kinds["vacancy_site"] += 1
        elif dc * s < 0.75:
            kinds["split"] += 1
        else:
            kinds["empty_site"] += 1
    near_seam = 0
    for k in bad:
        if any(abs(x[k] - t) < 4 or abs(y[k] - t) < 4 for t in seams):
            near_seam += 1
    return {"n": int(len(bad)), **kinds, "near_edge_3px": int((edge[bad] < 3).sum()), "near_seam_4px": near_seam,
            "heat_median": float(np.median(cols.score[bad])) if len(bad) else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4)
    args = ap.parse_args(argv)
    from beamloop.edge.learn.evaluate import position_error_floor
    from beamloop.edge.stages.find import ColumnFinder, FinderConfig
    from beamloop.edge.stages.unet import UNetFinder, _core, tile_origins

    shipped = UNetFinder(precision="fp32", device="cpu")
    fixed = UNetFinder(precision="fp32", device="cpu", relative_threshold=0.0, spacing_fraction=0.0)
    classical = ColumnFinder(FinderConfig.for_pixel_size(0.15))
    out: dict = {"frames": args.frames, "seeds": f"{SEED}..", "shape": [256, 256], "pixel_size_A": 0.15}
    for dose in (1e3, 1e4, 1e5, 1e6, 1e7):
        frames = [mos2_frame(dose_e_per_A2=dose, seed=SEED + k) for k in range(args.frames)]
        row = {}
        for name, fnd in (("unet_fixed_0.4_2.5px", fixed), ("unet_shipped", shipped)):
            ss, fps = [], []
            for f in frames:
                c = fnd.find(f.counts, "MoS2").columns
                ss.append(_score(c.xy, c.cls, f))
                fps.append(false_positives(c, f, []))
            s = combine(ss)
            row[name] = {"recall": round(s.recall, 4), "precision": round(s.precision, 4), "rms_pm": round(s.rms_pm, 2),
                         "false_positives": {k: int(sum(p[k] for p in fps)) for k in
                                             ("n", "split", "vacancy_site", "empty_site", "near_edge_3px")},
                         "per_class_rms_pm": {k: round(v["rms_pm"], 2) for k, v in s.per_class.items()
                                              if k != "vacancy"}}
        c = combine([_score(classical.find(f.counts).xy, None, f, generic=True) for f in frames])
        row["classical"] = {"recall": round(c.recall, 4), "precision": round(c.precision, 4), "rms_pm": round(c.rms_pm,
                                                                                                              2)}
        if dose <= 1e6:
            row["bound"] = {k: round(v, 2) for k, v in position_error_floor(dose, n=min(args.frames, 2)).items()}
        out[f"{dose:.0e}"] = row
        u = row["unet_shipped"]
        print(f"{dose:.0e}: shipped rec {u['recall']} prec {u['precision']} rms {u['rms_pm']} | fixed "
              f"{row['unet_fixed_0.4_2.5px']['precision']} | classical {c.recall:.4f}/{c.precision:.4f}/{c.rms_pm:.2f}"
              f" | {row.get('bound', '')}", flush=True)
    # tile seams: 512 x 512 frames at 1e4
    ss, fps = [], []
    o = tile_origins(512, shipped.session.tile, shipped.overlap)
    seams = [float(_core(o, k, 512, shipped.session.tile)[1]) - 0.5 for k in range(len(o) - 1)]
    for k in range(2):
        f = mos2_frame((512, 512), dose_e_per_A2=1e4, seed=SEED + 50 + k)
        c = shipped.find(f.counts, "MoS2").columns
        ss.append(_score(c.xy, c.cls, f))
        fps.append(false_positives(c, f, seams))
    s = combine(ss)
    out["512x512@1e4"] = {"recall": round(s.recall, 4), "precision": round(s.precision, 4), "rms_pm": round(s.rms_pm,
                                                                                                            2),
                          "seams_px": seams, "false_positives": int(sum(p["n"] for p in fps)),
                          "false_positives_within_4px_of_a_seam": int(sum(p["near_seam_4px"] for p in fps)),
                          "seam_band_area_fraction": round(1 - (1 - 8 * len(seams) / 512) ** 2, 3)}
    print("512x512@1e4:", out["512x512@1e4"], flush=True)
    # oracle on noise-free frames
    with noise_free():
        nf = [mos2_frame(dose_e_per_A2=1e6, seed=SEED + k) for k in range(args.frames)]
        nd = [mos2_frame(dose_e_per_A2=1e6, seed=SEED + k, distortion_scale=0.0) for k in range(args.frames)]
    oracle = {}
    for tag, fr in (("noise_free", nf), ("noise_free_no_scan_distortion", nd)):
        cu = combine([_score(shipped.find(f.counts, "MoS2").columns.xy, shipped.find(f.counts, "MoS2").columns.cls, f)
                      for f in fr])
        cc = combine([_score(classical.find(f.counts).xy, None, f, generic=True) for f in fr])
        oracle[tag] = {"unet_rms_pm": round(cu.rms_pm, 2), "classical_rms_pm": round(cc.rms_pm, 2),
                       "unet_recall": round(cu.recall, 4)}
    # which part of the scan distortion makes the floor (noise-free frames, classical finder)
    parts = {"typical": {}, "no_line_jitter": {"jitter_fast_A": 0.0, "jitter_slow_A": 0.0},
             "no_wobble": {"wobble_A": 0.0}, "no_drift": {"drift_A_per_s": (0.0, 0.0)}}
    for tag, ov in parts.items():
        with noise_free():
            fr = [_frame_with(SEED + k, 1e6, **ov) for k in range(args.frames)]
        oracle.setdefault("floor_by_distortion_part_classical_pm", {})[tag] = round(
            combine([_score(classical.find(f.counts).xy, None, f, generic=True) for f in fr]).rms_pm, 2)
    out["oracle"] = oracle
    print("oracle:", oracle)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "unet_diagnose.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
