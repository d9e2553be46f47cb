"""The trigger contract (beamloop.edge.trigger.base.Trigger) and the registry behind make_trigger."""

import math

import numpy as np
import pytest

import beamloop.edge.trigger as trigger_pkg
from beamloop.edge.trigger import (
    TRIGGERS,
    CusumTrigger,
    ModelTrigger,
    Trigger,
    WindowTrigger,
    make_trigger,
    register_trigger,
    trigger_names,
)


@pytest.mark.parametrize("cls", [CusumTrigger, WindowTrigger, ModelTrigger])
def test_every_trigger_class_satisfies_the_protocol(cls):
    t = cls()
    assert isinstance(t, Trigger)
    assert t.name in TRIGGERS and t.trigger_sample == -1 and math.isnan(t.baseline_rate)


def test_the_registry_names_the_three_shipped_triggers_in_order():
    assert TRIGGERS == trigger_names() == ("cusum", "window", "model")


@pytest.mark.parametrize("name", trigger_names())
def test_make_trigger_builds_each_registered_name_and_it_runs_a_dwell(name):
    t = make_trigger(name)
    assert isinstance(t, Trigger) and t.name == name
    t.start(expected_rate=8.0)
    assert t.baseline_rate == 8.0
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.poisson(8.0, 400), rng.poisson(4.0, 400)]).astype(np.uint16)
    fired = [k for k in (t.update(x[a:a + 100]) for a in range(0, len(x), 100)) if k >= 0]
    # every trigger fires once, after the drop at sample 400 and within its 400 lowered samples
    assert len(fired) == 1 and 400 <= t.trigger_sample < 800


def test_make_trigger_passes_options_and_rejects_unknown_names():
    assert make_trigger("cusum", h=6.0).h == 6.0
    assert make_trigger("model", threshold=7).threshold == 7
    with pytest.raises(ValueError, match="unknown trigger 'magic'; expected one of"):
        make_trigger("magic")
    with pytest.raises(TypeError):
        make_trigger("window", nonsense=1)


class _Always:
    """A minimal trigger that fires on the first sample it sees (structural: no base class)."""

    name = "always"

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.start()

    def start(self, expected_rate=None) -> None:
        self.trigger_sample = -1
        self.baseline_rate = math.nan if expected_rate is None else float(expected_rate)

    def update(self, block) -> int:
        if self.trigger_sample < 0 and len(block):
            self.trigger_sample = self.offset
            return 0
        return -1


@pytest.fixture
def restore_registry():
    saved = dict(trigger_pkg._FACTORIES)
    yield
    trigger_pkg._FACTORIES.clear()
    trigger_pkg._FACTORIES.update(saved)


def test_register_trigger_adds_a_name_that_make_trigger_and_TRIGGERS_see(restore_registry):
    register_trigger("always", _Always)
    assert trigger_pkg.TRIGGERS == ("cusum", "window", "model", "always")
    t = make_trigger("always", offset=3)
    assert isinstance(t, Trigger) and t.update(np.ones(5, np.uint16)) == 0 and t.trigger_sample == 3
    with pytest.raises(ValueError, match="already registered"):
        register_trigger("always", _Always)
    register_trigger("always", lambda: _Always(offset=9), replace=True)
    assert make_trigger("always").offset == 9


def test_register_trigger_rejects_bad_entries(restore_registry):
    with pytest.raises(ValueError, match="non-empty"):
        register_trigger("", _Always)
    with pytest.raises(TypeError, match="not callable"):
        register_trigger("x", 3)
    register_trigger("not_a_trigger", dict)
    with pytest.raises(TypeError, match="not a Trigger"):
        make_trigger("not_a_trigger")
