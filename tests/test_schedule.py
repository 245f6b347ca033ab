import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerlock_plugin.errors import ConfigError
from layerlock_plugin.schedule import FreezeSchedule, NoFreezing, RecordedSchedule, ScheduleConfig

configs = st.builds(
    lambda pixel, interval, jump, frac_or_count, layers: (
        ScheduleConfig(pixel_steps=pixel, interval=interval, jump=jump, max_frozen=frac_or_count(layers)),
        layers,
    ),
    st.integers(0, 500),
    st.integers(1, 200),
    st.integers(1, 4),
    st.sampled_from([lambda L: max(1, L // 2), lambda L: L - 1, lambda L: 0.75, lambda L: 0.5]),
    st.integers(2, 48),
)


@settings(max_examples=200, deadline=None)
@given(configs, st.lists(st.integers(0, 20_000), min_size=2, max_size=30))
def test_plan_is_monotone_and_never_reaches_decoder_layers(cfg_layers, steps):
    cfg, layers = cfg_layers
    sched = FreezeSchedule(cfg, layers)
    plans = [sched.plan(s) for s in sorted(steps)]
    for a, b in zip(plans, plans[1:]):
        assert b.num_frozen >= a.num_frozen and b.target_layer >= a.target_layer and b.stage >= a.stage
    for p in plans:
        # freezable layers exclude decoder-reused ones by construction; one encoder block keeps training
        assert 0 <= p.num_frozen <= sched.max_frozen < layers
        assert p.target_layer == p.num_frozen
        assert p.stem_frozen == (p.num_frozen > 0)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_switch_steps_are_exactly_where_configured(cfg_layers):
    cfg, layers = cfg_layers
    sched = FreezeSchedule(cfg, layers)
    max_frozen = cfg.resolve_max_frozen(layers)
    expected_steps = []
    depth = 0
    while depth < max_frozen:
        expected_steps.append(cfg.pixel_steps + len(expected_steps) * cfg.interval)
        depth = min(depth + cfg.jump, max_frozen)
    assert [s for s, _ in sched.events()] == expected_steps
    assert sched.events()[-1][1] == max_frozen
    for i, (s, d) in enumerate(sched.events()):
        assert sched.plan(s).is_switch and sched.plan(s).num_frozen == d and sched.plan(s).steps_since_switch == 0
        before = sched.plan(s - 1) if s > 0 else None
        if before is not None:
            assert before.num_frozen < d and not (before.is_switch and before.stage == i + 1)
        assert sched.plan(s + 1).steps_since_switch == (1 if i + 1 == len(expected_steps) or expected_steps[i + 1] > s + 1 else 0)
    # the pixel phase is exactly pixel_steps long
    if cfg.pixel_steps > 0:
        assert sched.plan(cfg.pixel_steps - 1).target_layer == 0
    assert sched.plan(cfg.pixel_steps).target_layer == min(cfg.jump, max_frozen)


def test_paper_vit_g_timeline():
    # ViT-G: 48 blocks, decoder = last 4 -> 44 freezable; 160K pixel steps, one block every 10K, 32 blocks
    sched = FreezeSchedule(ScheduleConfig(pixel_steps=160_000, interval=10_000, jump=1, max_frozen=32), 44)
    assert sched.events()[0] == (160_000, 1)
    assert sched.events()[-1] == (470_000, 32)
    assert sched.plan(159_999).num_frozen == 0
    assert sched.plan(1_000_000).num_frozen == 32


def test_fraction_of_encoder():
    assert FreezeSchedule(ScheduleConfig(max_frozen=0.75), 8).max_frozen == 6


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(interval=0), "schedule.interval"),
        (dict(jump=-1), "schedule.jump"),
        (dict(pixel_steps=-5), "schedule.pixel_steps"),
        (dict(max_frozen=0), "schedule.max_frozen"),
        (dict(max_frozen=1.0), "schedule.max_frozen"),
        (dict(max_frozen=1.5), "schedule.max_frozen"),
        (dict(max_frozen="all"), "schedule.max_frozen"),
        (dict(freeze_stem="yes"), "schedule.freeze_stem"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ScheduleConfig(**kwargs)
    assert str(e.value).startswith(field)


def test_max_frozen_not_below_encoder_depth():
    with pytest.raises(ConfigError, match=r"schedule.max_frozen: must be smaller than the number of freezable encoder blocks \(4\)"):
        FreezeSchedule(ScheduleConfig(max_frozen=4), 4)
    with pytest.raises(ConfigError, match="schedule.max_frozen"):
        FreezeSchedule(ScheduleConfig(max_frozen=0.1), 4)  # rounds to 0 blocks


def test_schedule_longer_than_run_warns():
    sched = FreezeSchedule(ScheduleConfig(pixel_steps=100, interval=50, max_frozen=3), 6)
    with pytest.warns(UserWarning, match="only 2 of 3 blocks"):
        sched.warn_if_longer_than(200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.warn_if_longer_than(201)


def test_recorded_schedule_replays_events():
    sched = FreezeSchedule(ScheduleConfig(pixel_steps=10, interval=7, jump=2, max_frozen=5), 8)
    replay = RecordedSchedule.from_events(sched.events(), 8)
    assert all(replay.plan(s) == sched.plan(s) for s in range(60))
    with pytest.raises(ConfigError, match="strictly increasing"):
        RecordedSchedule.from_events([(10, 1), (5, 2)], 8)
    assert NoFreezing(8).plan(10**6).num_frozen == 0
