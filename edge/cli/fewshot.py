"""``beamloop fewshot``: few-shot chip classification of images (label support chips, classify, train).

    beamloop fewshot label IMAGE --chip-px 64 --out support.json --chip CLASS:ROW,COL [--chip ...]
    beamloop fewshot label IMAGE --chip-px 64 --out support.json --pick CLASS[,CLASS...]    (matplotlib picker)
    beamloop fewshot classify IMAGE... --support support.json --out DIR
    beamloop fewshot train [--episodes 1500] [--out edge/models/fewshot]

``label`` writes a support set (:class:`beamloop.edge.analysis.fewshot.SupportSet`): chips by their top-left
pixel, or clicked in a window (number keys choose the class, a click adds the chip under it, closing the
window saves). ``--lattice-px L`` chooses the chip size from the lattice scale instead (six spacings).
``classify`` tiles each image, embeds the chips with the shipped ONNX encoder and classifies them by the
prototypes of the support chips (no retraining); per image it writes ``STEM_chips.csv`` (every chip:
position, class, confidence, class probabilities), ``STEM_map.png`` (the chip map) and ``STEM_overlay.png``,
and prints the class statistics. ``train`` trains the encoder on simulated chips (the ``train`` extra:
torch) and exports it with its manifest.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from beamloop.edge.cli.types import bounded, parse_count, parse_positive


def _parse_chip(text: str) -> tuple[str, int, int]:
    """``CLASS:ROW,COL`` -> (class, row, col)."""
    try:
        cls, pos = text.rsplit(":", 1)
        r, c = (int(v) for v in pos.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not CLASS:ROW,COL (top-left pixel of the chip)") from None
    if not cls or r < 0 or c < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not CLASS:ROW,COL with a class name and pixels >= 0")
    return cls, r, c


def _pick(image, chip_px: int, classes: list[str], name: str):
    """The interactive picker: returns a SupportSet of the chips clicked."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from beamloop.edge.analysis.fewshot import SupportSet

    s = SupportSet(chip_px)
    state = {"k": 0}
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(image, cmap="gray")
    colours = plt.cm.tab10.colors

    def title() -> None:
        ax.set_title(f"class {state['k'] + 1}: {classes[state['k']]} (keys 1-{len(classes)} switch; click adds a "
                     "chip; close to save)")
        fig.canvas.draw_idle()

    def on_key(ev) -> None:
        if ev.key and ev.key.isdigit() and 1 <= int(ev.key) <= len(classes):
            state["k"] = int(ev.key) - 1
            title()

    def on_click(ev) -> None:
        if ev.inaxes is not ax or ev.xdata is None:
            return
        r = int(ev.ydata // chip_px) * chip_px
        c = int(ev.xdata // chip_px) * chip_px
        if r + chip_px > image.shape[0] or c + chip_px > image.shape[1]:
            return
        s.add(classes[state["k"]], name, r, c)
        ax.add_patch(Rectangle((c, r), chip_px, chip_px, fill=False, ec=colours[state["k"] % 10], lw=2))
        fig.canvas.draw_idle()

    fig.canvas.mpl_connect("key_press_event", on_key)
    fig.canvas.mpl_connect("button_press_event", on_click)
    title()
    plt.show()
    return s


def cmd_label(a: argparse.Namespace) -> int:
    """``beamloop fewshot label``: write a support set; 0, or 1 (bad image, chip, or no display for --pick)."""
    from beamloop.edge.analysis.fewshot import FewShotError, SupportSet, chip_at, chip_px_for_scale
    from beamloop.edge.cli import error
    from beamloop.edge.experiments.search import load_image

    try:
        image = load_image(a.image)
        chip = a.chip_px if a.chip_px else chip_px_for_scale(a.lattice_px)
        if a.pick:
            import matplotlib

            if matplotlib.get_backend().lower() == "agg":
                error("fewshot", "--pick needs a display (matplotlib has only the non-interactive Agg backend "
                                 "here); give chips with --chip CLASS:ROW,COL instead")
                return 1
            s = _pick(image, chip, [c for c in a.pick.split(",") if c], str(a.image))
        else:
            s = SupportSet(chip)
            for cls, r, c in a.chip:
                chip_at(image, r, c, chip)  # checks that it lies inside
                s.add(cls, str(a.image), r, c)
        SupportSet.from_json(s.to_json())  # at least two classes, each with chips
    except (ValueError, FewShotError) as exc:
        error("fewshot", str(exc))
        return 1
    Path(a.out).write_text(s.to_json() + "\n")
    print(f"support set: {', '.join(f'{k} ({len(v)})' for k, v in s.chips.items())}, chips of {chip} px -> {a.out}")
    return 0


def cmd_classify(a: argparse.Namespace) -> int:
    """``beamloop fewshot classify``: maps, overlays and CSV per image; 0, or 1 (bad support, image or
    encoder)."""
    import numpy as np

    from beamloop.edge.analysis.fewshot import ChipEncoder, FewShotError, SupportSet, classify_frame
    from beamloop.edge.cli import error
    from beamloop.edge.experiments.search import load_image

    try:
        support = SupportSet.from_json(Path(a.support).read_text())
        images = {str(p): load_image(p) for p in a.images}
        needed = {name for items in support.chips.values() for name, _, _ in items}
        for name in needed - set(images):
            images[name] = load_image(name)
        enc = ChipEncoder(a.model)
        clf = support.embed(enc, images)
    except (ValueError, FewShotError, OSError) as exc:
        error("fewshot", str(exc))
        return 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for p in a.images:
        img = images[str(p)]
        try:
            cm = classify_frame(img, clf, enc, support.chip_px)
        except FewShotError as exc:
            error("fewshot", f"{p}: {exc}")
            return 1
        stem = Path(p).stem
        rows = cm.rows()
        with open(out / f"{stem}_chips.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        cmap = plt.get_cmap("tab10", max(len(cm.classes), 2))
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(cm.labels, cmap=cmap, vmin=-0.5, vmax=len(cm.classes) - 0.5)
        ax.set_title("chip classes (alpha: confidence)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(k)) for k in range(len(cm.classes))]
        ax.legend(handles, cm.classes, loc="upper right", fontsize=7)
        fig.savefig(out / f"{stem}_map.png", dpi=90)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 7))
        ax.imshow(img, cmap="gray")
        n_r, n_c = cm.labels.shape
        rgba = np.zeros((n_r, n_c, 4))
        rgba[..., :3] = np.array([cmap(int(k))[:3] for k in cm.labels.ravel()]).reshape(n_r, n_c, 3)
        rgba[..., 3] = 0.45 * cm.confidence
        ax.imshow(rgba, extent=(-0.5, n_c * cm.chip_px - 0.5, n_r * cm.chip_px - 0.5, -0.5), interpolation="nearest")
        ax.legend(handles, cm.classes, loc="upper right", fontsize=7)
        ax.set_title(f"{stem}: few-shot chips of {cm.chip_px} px")
        fig.savefig(out / f"{stem}_overlay.png", dpi=90)
        plt.close(fig)
        stats = cm.stats()
        print(f"{p}: " + ", ".join(f"{k} {v['chips']} chips ({v['fraction']:.0%}, conf {v['mean_confidence']:.2f})"
                                   for k, v in stats.items()))
    print(f"chip maps, overlays and CSV -> {out}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    """``beamloop fewshot train``: train and export the encoder; 0, or 1 (torch missing)."""
    from beamloop.edge.cli import error

    try:
        import torch  # noqa: F401 - the train extra
    except ImportError:
        error("fewshot", "training needs torch: pip install -e '.[train]'")
        return 1
    from beamloop.edge.learn.fewshot_train import TrainConfig, train_and_export

    try:
        cfg = TrainConfig(episodes=a.episodes, seed=a.seed)
    except ValueError as exc:
        error("fewshot", str(exc))
        return 1
    m = train_and_export(cfg, Path(a.out), log=lambda t: print(t, file=sys.stderr))
    print(f"encoder -> {Path(a.out) / 'encoder.onnx'} (sha256 {m['sha256'][:12]}...), held-out accuracy "
          f"{ {k: round(v, 3) for k, v in m['metrics'].items() if k.startswith('shots_')} }")
    return 0


def register(sub) -> None:
    """Add ``fewshot`` (``label``, ``classify``, ``train``) to the ``beamloop`` subcommands."""
    from beamloop.edge.analysis.fewshot import MODEL_DIR

    p = sub.add_parser("fewshot", help="few-shot chip classification: label support chips, classify images, train")
    fs = p.add_subparsers(dest="fewshot_cmd", required=True)
    lab = fs.add_parser("label", help="choose support chips (by coordinates or a matplotlib picker)")
    lab.add_argument("image", type=Path)
    size = lab.add_mutually_exclusive_group(required=True)
    size.add_argument("--chip-px", type=bounded(parse_count, 8, 4096), help="chip side, pixels")
    size.add_argument("--lattice-px", type=parse_positive, help="lattice spacing, pixels (chip: six spacings)")
    how = lab.add_mutually_exclusive_group(required=True)
    how.add_argument("--chip", type=_parse_chip, action="append", help="CLASS:ROW,COL (repeat)")
    how.add_argument("--pick", help="CLASS[,CLASS...]: pick chips in a window")
    lab.add_argument("--out", required=True, type=Path, help="support set JSON to write")
    lab.set_defaults(func=cmd_label)
    cl = fs.add_parser("classify", help="chip maps, overlays and CSV of images from a support set")
    cl.add_argument("images", nargs="+", type=Path)
    cl.add_argument("--support", required=True, type=Path, help="support set JSON (fewshot label)")
    cl.add_argument("--out", required=True, type=Path, help="output folder")
    cl.add_argument("--model", type=Path, default=None, help="encoder ONNX (default: the shipped one)")
    cl.set_defaults(func=cmd_classify)
    tr = fs.add_parser("train", help="train the chip encoder on simulated chips and export ONNX (needs torch)")
    tr.add_argument("--episodes", type=bounded(parse_count, 1, 100000), default=1500)
    tr.add_argument("--seed", type=parse_count, default=0)
    tr.add_argument("--out", type=Path, default=MODEL_DIR, help="folder for encoder.onnx and manifest.json")
    tr.set_defaults(func=cmd_train)
