"""The frame-stage contract and its runner: slot checks, prepare on metadata changes, latency keys,
and the defects the contract removed (stale bonds, the policy's half-fixed row)."""

import numpy as np
import pytest

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.context import FrameMeta
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.frame.stage import FrameStage, StageBase
from beamloop.edge.materials import GENERIC, MOS2
from beamloop.edge.path import FramePath, PathError, classical_stages, frame_path
from beamloop.edge.sim.frames import mos2_frame
from beamloop.edge.stages.find import ColumnFinder, FinderConfig
from beamloop.edge.stages.policy import VacancyLinePolicy
from beamloop.edge.stages.vacancies import InferVacancySites

PX = 0.15


class Counting(StageBase):
    """A stage that counts its calls and copies the image's sum into ``noise``."""

    name = "count"
    reads = ("image",)
    writes = ("noise",)

    def __init__(self):
        self.prepared, self.processed, self.resets = [], 0, 0

    def prepare(self, meta):
        self.prepared.append(meta)

    def process(self, ctx):
        self.processed += 1
        ctx.noise = float(ctx.image.sum())

    def reset(self):
        self.resets += 1


class ReadsColumns(StageBase):
    name = "needs_columns"
    reads = ("columns",)
    writes = ("targets",)

    def process(self, ctx):
        ctx.targets = []


def test_construction_checks_the_slot_order_names_and_protocol():
    with pytest.raises(PathError, match="reads \\['columns'\\]"):
        FramePath([ReadsColumns()], GENERIC)
    with pytest.raises(PathError, match="two stages are called 'count'"):
        FramePath([Counting(), Counting()], GENERIC)

    class Unknown(Counting):
        writes = ("heat",)

    with pytest.raises(PathError, match="unknown slot 'heat'"):
        FramePath([Unknown()], GENERIC)
    with pytest.raises(PathError, match="FrameStage protocol"):
        FramePath([object()], GENERIC)
    p = frame_path("classical", "MoS2", VacancyLinePolicy(2))
    assert p.names == ("background", "preprocess", "find", "classify", "vacancies", "ood", "policy")
    assert all(isinstance(s, FrameStage) for s in p.stages)
    assert frame_path("classical", "generic").names == ("background", "preprocess", "find", "classify", "ood")


def test_prepare_runs_on_metadata_changes_only_and_reset_reaches_every_stage():
    c = Counting()
    path = FramePath([c], GENERIC)
    a = np.ones((8, 8), np.uint16)
    for _ in range(3):
        path.run(a, 0.2)
    assert len(c.prepared) == 1 and c.processed == 3 and path.ctx.noise == 64.0
    path.run(a.astype(np.float32), 0.2)  # dtype changed
    path.run(np.ones((8, 9), np.float32), 0.2)  # shape changed
    path.run(np.ones((8, 9), np.float32), 0.3)  # pixel size changed
    path.run(np.ones((8, 9), np.float32), 0.3)
    assert len(c.prepared) == 4
    assert c.prepared[-1] == FrameMeta((8, 9), np.dtype(np.float32), 0.3, GENERIC)
    path.reset()
    assert c.resets == 1


def test_latency_is_recorded_under_the_stage_names_unless_told_not_to():
    lat = LatencyRecorder()
    path = frame_path("classical", "MoS2", latency=lat)
    fr = mos2_frame(shape=(96, 96), pixel_size_A=PX, seed=1)
    path.run(fr.counts, PX, record=False)
    assert lat.summary() == {}
    ctx = path.run(fr.counts, PX)
    assert set(ctx.timings_ns) == set(path.names)
    assert {k: v["n"] for k, v in lat.summary().items()} == {n: 1 for n in path.names}


def test_classical_path_gives_the_finder_s_columns_bit_for_bit():
    fr = mos2_frame(shape=(128, 128), pixel_size_A=PX, seed=7)
    cols = ColumnFinder(FinderConfig.for_pixel_size(PX)).find(fr.counts)
    ctx = frame_path("classical", "MoS2").run(fr.counts, PX)
    found = ctx.columns.select(ctx.columns.cls < 3)  # without the inferred vacancy sites
    assert np.array_equal(found.x, cols.x) and np.array_equal(found.y, cols.y)
    assert np.array_equal(found.intensity, cols.intensity)


def test_a_calibrated_frame_without_a_visible_period_takes_its_scale_from_the_pixel_size():
    """48 x 48 px of MoS2 at 0.15 A/px (7 A: too few periods for the autocorrelation) on the generic path: the
    column sigma 0.33 A / 0.15 A/px = 2.2 px sets the scale; the columns are found (Mo and S2 within 0.5 A)."""
    fr = mos2_frame(shape=(48, 48), pixel_size_A=PX, dose_e_per_A2=1e6, seed=2)
    path = frame_path("classical", "generic")
    ctx = path.run(fr.counts, PX)
    assert path.meta.column_sigma_px == pytest.approx(GENERIC.column_sigma_A / PX)
    assert path.meta.period_px == pytest.approx(5.5 * GENERIC.column_sigma_A / PX)
    inner = [(x, y) for x, y in fr.truth_xy if 3 <= x <= 44 and 3 <= y <= 44]
    d = np.hypot(*(ctx.columns.xy[None, :, :] - np.array(inner)[:, None, :]).transpose(2, 0, 1)).min(axis=1)
    assert len(inner) >= 6 and np.mean(d * PX < 0.5) >= 0.9


def test_a_frame_with_neither_pixel_size_nor_period_is_refused_by_name():
    from beamloop.edge.frame.stage import FrameError

    flat = np.full((48, 48), 50, np.float32)
    with pytest.raises(FrameError, match="no pixel size and its lattice scale cannot be estimated: image is flat"):
        frame_path("classical", "generic").run(flat, None)
    path = frame_path("classical", "generic")  # the same flat frame with its pixel size is processed (no columns)
    assert len(path.run(flat, PX).columns) == 0 and path.meta.column_sigma_px == pytest.approx(0.33 / PX)


def test_bonds_are_never_those_of_an_earlier_frame():
    """A frame with fewer than 4 columns after a normal one: no bonds (the old classifier kept the last)."""
    path = frame_path("classical", "MoS2")
    fr = mos2_frame(shape=(128, 128), pixel_size_A=PX, seed=2)
    assert path.run(fr.counts, PX).bonds is not None
    few = np.full((128, 128), 3, np.uint16)
    few[60:63, 60:63] = 400  # one bright column only
    ctx = path.run(few, PX)
    assert len(ctx.columns) < 4 and ctx.bonds is None
    # and the stage alone: a table that is not MoS2-classified gives no bonds
    st = InferVacancySites()
    st.prepare(FrameMeta((16, 16), np.dtype(np.float32), PX, MOS2))
    ctx.columns, ctx.bonds = ColumnTable.empty(), np.ones((3, 2))
    st.process(ctx)
    assert ctx.bonds is None


def _mo_only(n=6):
    x = np.arange(n, dtype=np.float32) * 12 + 40
    return ColumnTable(x, np.full(n, 60, np.float32), np.ones(n, np.float32), np.ones(n, np.float32),
                       np.zeros(n, np.int8), MOS2.class_names)


def test_policy_fixes_its_row_only_with_an_anchor():
    """Two frames with bonds but no S column: no targets and no crash (the row and its anchor stay unset)."""
    pol = VacancyLinePolicy(4)
    scan = ScanFrame(1, (128, 128), (1.92, 1.92))
    bonds = np.array([[12.2, 0.0], [-6.1, 10.5], [-6.1, -10.5]])
    for _ in range(2):
        assert pol.select(_mo_only(), scan, bonds) == []
    assert pol.anchor_frac is None and pol.direction_px is None


def test_verification_frames_ask_for_no_targets_without_touching_the_policy():
    pol = VacancyLinePolicy(3)
    path = FramePath(classical_stages(MOS2, pol), MOS2)
    fr = mos2_frame(shape=(192, 192), pixel_size_A=PX, seed=4)
    scan = ScanFrame(1, (192, 192), (192 * PX / 10,) * 2)
    assert path.run(fr.counts, PX, scan, want_targets=False).targets == []
    assert pol.anchor_frac is None and pol.targets_per_frame == 3
    targets = path.run(fr.counts, PX, scan).targets
    assert 1 <= len(targets) <= 3 and pol.anchor_frac is not None
    assert path.run(fr.counts, PX).targets == []  # no scan frame: no targets


def test_float64_frames_beyond_float32_range_are_refused_by_name():
    from beamloop.edge.frame.stage import FrameError, check_frame

    fr = mos2_frame(shape=(64, 64), seed=1).counts.astype(np.float64)
    with pytest.raises(FrameError, match="beyond float32's range"):
        check_frame(fr * 1e300)
    check_frame(fr * 1e30)  # large but representable: taken
