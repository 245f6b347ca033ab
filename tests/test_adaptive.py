"""The adaptive schedule: config errors, the signals and guards, the controller integration, exact
resume (controller and reference trainer), and replaying a recorded schedule in a new run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import ToyEncoder
from layerlock_plugin._config import from_dict
from layerlock_plugin.adaptive import AdaptiveSchedule, main as adaptive_main, read_recorded_events, recorded_schedule_config
from layerlock_plugin.controller import LayerLock, LayerLockConfig, build_schedule
from layerlock_plugin.errors import CheckpointError, ConfigError
from layerlock_plugin.schedule import AdaptiveConfig, RecordedSchedule, ScheduleConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def adaptive_config(max_frozen=3, jump=1, **kw) -> ScheduleConfig:
    a = dict(observe_every=2, window=3, signal="update", update_threshold=0.5, min_pixel_steps=4, min_interval=4)
    a.update(kw)
    return ScheduleConfig(kind="adaptive", max_frozen=max_frozen, jump=jump, adaptive=AdaptiveConfig(**a))


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(observe_every=0), "schedule.adaptive.observe_every"),
        (dict(window=1), "schedule.adaptive.window"),
        (dict(signal="loss"), "schedule.adaptive.signal"),
        (dict(update_threshold=1.0), "schedule.adaptive.update_threshold"),
        (dict(update_threshold=0), "schedule.adaptive.update_threshold"),
        (dict(norm_tolerance=1.5), "schedule.adaptive.norm_tolerance"),
        (dict(min_pixel_steps=-1), "schedule.adaptive.min_pixel_steps"),
        (dict(observe_every=10, min_interval=5), "schedule.adaptive.min_interval"),
        (dict(min_interval=100, max_interval=50), "schedule.adaptive.max_interval"),
        (dict(observe_every=10, window=5, min_interval=10, max_interval=20), "schedule.adaptive.max_interval"),
        (dict(min_pixel_steps=200, max_pixel_steps=100), "schedule.adaptive.max_pixel_steps"),
    ],
)
def test_bad_adaptive_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        AdaptiveConfig(**kwargs)
    assert str(e.value).startswith(field + ":")


def test_schedule_kind_and_recorded_events_validated():
    with pytest.raises(ConfigError, match=r"^schedule\.kind: must be one of 'explicit', 'adaptive', 'recorded'"):
        ScheduleConfig(kind="auto")
    with pytest.raises(ConfigError, match=r"^schedule\.events: schedule.kind is 'recorded' but no events"):
        ScheduleConfig(kind="recorded")
    with pytest.raises(ConfigError, match=r"^schedule\.events: is only used with schedule.kind: recorded"):
        ScheduleConfig(events=[[5, 1]])
    with pytest.raises(ConfigError, match=r"^schedule\.events\[1\]: must be a \[step, num_frozen\] pair"):
        ScheduleConfig(kind="recorded", events=[[5, 1], [7]])
    with pytest.raises(ConfigError, match=r"^schedule\.events: steps and num_frozen must both be strictly increasing"):
        ScheduleConfig(kind="recorded", events=[[5, 1], [4, 2]])
    with pytest.raises(ConfigError, match=r"^schedule\.adaptive\.thresh: unknown key"):
        from_dict(ScheduleConfig, {"kind": "adaptive", "adaptive": {"thresh": 0.1}}, "schedule")
    # YAML lists become the normalised tuple form, so a dumped and reloaded config compares equal
    cfg = from_dict(ScheduleConfig, {"kind": "recorded", "events": [[5, 1], [9, 2]]}, "schedule")
    assert cfg.events == ((5, 1), (9, 2)) and cfg.resolve_max_frozen(4) == 2
    with pytest.raises(ConfigError, match=r"^schedule\.events: the last event freezes 4 blocks"):
        ScheduleConfig(kind="recorded", events=[[5, 4]]).resolve_max_frozen(4)


# -- signals and guards on hand-moved parameters ------------------------------------------------------------
def _move(encoder: ToyEncoder, block: int, size: float, gen: torch.Generator) -> None:
    """Move block ``block`` (1-based) by ``size`` in a random direction (an 'optimizer step')."""
    with torch.no_grad():
        for p in encoder.blocks[block - 1].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * size)


def _drive(schedule: AdaptiveSchedule, encoder: ToyEncoder, steps: int, size_fn) -> list:
    gen = torch.Generator().manual_seed(0)
    decided = []
    for step in range(steps):
        d = schedule.observe(step)
        if d is not None:
            decided.append(d)
        for k in range(1, 5):
            _move(encoder, k, size_fn(step, k), gen)
    return decided


def test_update_signal_freezes_when_a_block_stops_moving():
    torch.manual_seed(0)
    enc = ToyEncoder()
    sched = AdaptiveSchedule(adaptive_config(max_frozen=2), enc.layerlock_units())
    # block 1 moves steadily until step 20, then stops; observations every 2 steps, window 3: the
    # smoothed update is the peak until 20, then 2/3 of it at 22 and 1/3 (<= 0.5) at step 24
    decided = _drive(sched, enc, 100, lambda s, k: 0.01 if (k == 1 and s < 20) or (k == 2 and s < 40) else 0.0)
    assert [(d.step, d.num_frozen, d.reason) for d in decided] == [(24, 1, "converged"), (44, 2, "converged")]
    assert sched.plan(23).num_frozen == 0 and sched.plan(24).is_switch and sched.plan(99).num_frozen == 2
    # the signals recorded for block 1 show what the decision was based on
    obs = {o.step: o for o in sched.history if o.first_block == 1}
    assert not any(o.update_converged for step, o in obs.items() if step < 24)
    assert obs[24].update_smoothed <= 0.5 * obs[24].update_peak < obs[22].update_smoothed


def test_guards_min_pixel_steps_min_and_max_interval():
    torch.manual_seed(0)
    enc = ToyEncoder()
    # nothing ever moves: 'update' is never above its peak of 0 ... and 0 <= 0.5 * 0 -> converged at once
    sched = AdaptiveSchedule(adaptive_config(min_pixel_steps=10, min_interval=6), enc.layerlock_units())
    decided = _drive(sched, enc, 60, lambda s, k: 0.0)
    assert [d.step for d in decided] == [10, 16, 22]  # as early as the guards allow
    assert sched.plan(10**6).num_frozen == 3 and sched.done
    # blocks that keep moving steadily never converge: max_pixel_steps / max_interval force the events
    enc = ToyEncoder()
    sched = AdaptiveSchedule(adaptive_config(max_pixel_steps=30, max_interval=12, jump=2), enc.layerlock_units())
    decided = _drive(sched, enc, 100, lambda s, k: 0.01)
    assert [(d.step, d.num_frozen, d.reason) for d in decided] == [(30, 2, "max_pixel_steps"), (42, 3, "max_interval")]


def test_norm_signal_plateau_and_decrease():
    torch.manual_seed(0)
    enc = ToyEncoder()
    cfg = adaptive_config(max_frozen=1, signal="norm", norm_tolerance=0.0)
    sched = AdaptiveSchedule(cfg, enc.layerlock_units())

    decided = []
    for step in range(80):
        if (d := sched.observe(step)) is not None:
            decided.append(d)
        with torch.no_grad():
            enc.blocks[0].fc.weight.mul_(1.02 if step < 30 else 0.99)
    # the norm grows until 30, then decays. The window spans 3 observations = 6 steps: at step 32 it
    # holds 4 growth and 2 decay factors (up), at 34 two growths and four decays: 1.02^2 * 0.99^4 < 1
    assert [d.step for d in decided] == [34]
    assert sched.history[-2].norm_change > 0
    assert sched.history[-1].norm_change < 0


# -- through the controller --------------------------------------------------------------------------------
def _loop(ll: LayerLock, model: ToyEncoder, opt: torch.optim.Optimizer, start: int, end: int) -> None:
    """A tiny host loop: regress the model on fixed random data (a function of the step)."""
    for step in range(start, end):
        ll.begin_step(step)
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 6, 8, generator=g)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        loss.backward()
        ll.end_step(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)


def _build(schedule: ScheduleConfig, seed=0):
    torch.manual_seed(seed)
    model = ToyEncoder(p=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.05)
    ll = LayerLock(model, LayerLockConfig(schedule=schedule).with_method("freeze-only"), opt)
    return model, opt, ll


CTRL = adaptive_config(max_frozen=3, signal="either", norm_tolerance=0.002, min_pixel_steps=8, min_interval=6,
                       max_interval=20)


def test_controller_decides_records_and_resumes_exactly():
    model, opt, ll = _build(CTRL)
    events = []
    ll.on_event(events.append)
    _loop(ll, model, opt, 0, 60)
    assert ll.schedule.done and [e.num_frozen for e in events] == [1, 2, 3]
    assert [e.step for e in events] == list(ll.schedule.event_steps) and all(e.reason for e in events)
    assert "(adaptive:" in events[0].describe()
    assert "layerlock/adaptive/norm" in ll.metrics() or ll.schedule.done

    # stop in the middle of a watch window (after the first event), resume into fresh objects
    stop = ll.schedule.event_steps[0] + 3
    m1, o1, l1 = _build(CTRL)
    _loop(l1, m1, o1, 0, stop)
    state = {"model": m1.state_dict(), "opt": o1.state_dict(), "ll": l1.state_dict()}
    assert state["ll"]["schedule_state"]["events"] and state["ll"]["schedule_state"]["watch"]["snapshot"]
    m2, o2, l2 = _build(CTRL, seed=1)  # another init: everything must come from the state
    m2.load_state_dict(state["model"])
    l2.load_state_dict(state["ll"])
    o2.load_state_dict(state["opt"])
    _loop(l2, m2, o2, stop, 60)
    assert l2.schedule.event_steps == ll.schedule.event_steps
    a, b = model.state_dict(), m2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"


def test_resume_refuses_disagreeing_decisions_and_other_signal_state():
    model, opt, ll = _build(CTRL)
    _loop(ll, model, opt, 0, 40)
    state = ll.state_dict()
    first = ll.schedule.event_steps[0]
    # the guards changed so that the recorded first event could not have been taken
    later = dataclasses.replace(CTRL, adaptive=dataclasses.replace(CTRL.adaptive, min_pixel_steps=first + 2))
    with pytest.raises(CheckpointError, match=r"recorded adaptive decisions disagree with the config: event 1 .*min_pixel_steps"):
        _build(later)[2].load_state_dict(state)
    # a threshold change that the recorded events satisfy is allowed (it affects future decisions only)
    looser = dataclasses.replace(CTRL, adaptive=dataclasses.replace(CTRL.adaptive, update_threshold=0.3))
    _build(looser)[2].load_state_dict(state)
    # the signal state's meaning changed: refused by the identity check
    other = dataclasses.replace(CTRL, adaptive=dataclasses.replace(CTRL.adaptive, observe_every=4, min_interval=8))
    with pytest.raises(CheckpointError, match="different config; schedule"):
        _build(other)[2].load_state_dict(state)
    no_state = {k: v for k, v in state.items() if k != "schedule_state"}
    with pytest.raises(CheckpointError, match="no 'schedule_state'"):
        _build(CTRL)[2].load_state_dict(no_state)
    # an explicit-schedule state is refused by an adaptive config and vice versa
    with pytest.raises(CheckpointError, match="different config"):
        _build(ScheduleConfig(max_frozen=3))[2].load_state_dict(state)


def test_observation_is_once_per_step_and_replay_is_pure():
    model, opt, ll = _build(CTRL)
    ll.begin_step(0)
    ll.begin_step(0)  # e.g. gradient accumulation calls begin_step twice with the same global step
    assert [o.step for o in ll.schedule.history] == [0]
    _loop(ll, model, opt, 0, 60)
    replay = RecordedSchedule.from_events(ll.schedule.events(), ll.schedule.num_layers)
    assert all(replay.plan(s) == ll.schedule.plan(s) for s in range(70))
    built = build_schedule(ScheduleConfig(kind="recorded", events=ll.schedule.events()), model.layerlock_units())
    assert built.events() == ll.schedule.events()


# -- through the reference trainer ---------------------------------------------------------------------------
TINY = [
    "data.num_videos=64", "train.batch_size=8", "train.steps=26", "train.log_every=1", "train.ckpt_every=100",
    "train.progress=false", "train.threads=1", "schedule.max_frozen=3", "warmup.steps=4", "optim.warmup_steps=3",
    "probe.enabled=false", "guard.every=2", "schedule.kind=adaptive", "schedule.adaptive.observe_every=2",
    "schedule.adaptive.window=3", "schedule.adaptive.min_pixel_steps=6", "schedule.adaptive.min_interval=4",
    "schedule.adaptive.max_pixel_steps=12", "schedule.adaptive.max_interval=6",
]


def _trainer(tmp_path, *extra, stop_after=None, resume=None):
    from layerlock_plugin.reference.config import load_config
    from layerlock_plugin.reference.train import Trainer

    torch.manual_seed(123)
    trainer = Trainer(load_config(None, [f"out_dir={tmp_path}", *TINY, *extra]), resume=resume, echo=lambda s: None)
    trainer.fit(stop_after=stop_after)
    return trainer


def test_reference_trainer_adaptive_resume_and_recorded_replay(tmp_path, capsys):
    full = _trainer(tmp_path / "full")
    decided = full.layerlock.schedule.events()
    assert len(decided) == 3, decided
    rows = [json.loads(x) for x in (tmp_path / "full" / "events.jsonl").read_text().splitlines()]
    assert [(r["step"], r["num_frozen"]) for r in rows] == decided
    # resume in the middle of the second watch window: same decisions, bitwise the same weights and logs
    stop = decided[1][0] - 1
    _trainer(tmp_path / "part", stop_after=stop)
    resumed = _trainer(tmp_path / "part", resume=tmp_path / "part")
    assert resumed.layerlock.schedule.events() == decided
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adaptive run diverged"
    for name in ("events.jsonl", "metrics.jsonl"):
        strip = [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}
                 for x in (tmp_path / "full" / name).read_text().splitlines()]
        assert strip == [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}
                         for x in (tmp_path / "part" / name).read_text().splitlines()], name
    # the resumed config must agree with the recorded decisions
    with pytest.raises(CheckpointError, match="differing fields: schedule.adaptive.min_interval"):
        _trainer(tmp_path / "part", "schedule.adaptive.min_interval=6", resume=tmp_path / "part")

    # replay the decided schedule in a new run as a recorded schedule: the same training, bitwise
    section = recorded_schedule_config(tmp_path / "full")
    assert read_recorded_events(tmp_path / "full" / "events.jsonl") == decided
    assert adaptive_main([str(tmp_path / "full")]) == 0
    printed = capsys.readouterr().out.strip()
    sets = ["schedule.kind=recorded", f"schedule.events={json.dumps(section['events']).replace(' ', '')}"]
    assert printed == f"--set {sets[0]} --set 'schedule.events={json.dumps(section['events']).replace(' ', '')}'"
    replay = _trainer(tmp_path / "replay", *sets)
    assert replay.layerlock.schedule.events() == decided
    c = replay.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a), "a recorded replay must train exactly like the adaptive run"
    assert adaptive_main([str(tmp_path / "nothing")]) == 2


def test_plot_adaptive_signals(tmp_path):
    pytest.importorskip("matplotlib")
    from layerlock_plugin.reference.plots import _observations, plot_adaptive_signals
    from layerlock_plugin.schedule import FreezeSchedule

    model, opt, ll = _build(CTRL)
    rows = []
    for step in range(0, 60, 4):  # a host logging every 4 steps sees each observation at most once
        _loop(ll, model, opt, step, step + 4)
        rows.append({"step": step + 4, **ll.metrics()})
    obs = _observations(rows)
    assert {int(o["first_block"]) for o in obs} == {1, 2, 3}
    explicit = FreezeSchedule(ScheduleConfig(pixel_steps=20, interval=10, max_frozen=3), 4).events()
    for source in (rows, [o.as_dict() for o in ll.schedule.history]):
        out = plot_adaptive_signals(source, ll.schedule.events(), tmp_path / "a" / "signals.png",
                                    explicit_events=explicit, total_steps=60)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # no signals at all (e.g. an explicit run): still a figure that says so
    assert plot_adaptive_signals([], [], tmp_path / "empty.png").is_file()


def test_lightly_host_gets_adaptive_by_one_config_field():
    """The lightly adapter (a host that pre-creates one readout per possible target) runs the adaptive
    schedule unchanged: the planned depths are known up front, only the steps are decided."""
    pytest.importorskip("lightly")
    import test_lightly_adapter as lt

    cfg = lt.config()
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(
        cfg.schedule, kind="adaptive",
        adaptive=AdaptiveConfig(observe_every=1, window=2, signal="either", min_pixel_steps=3, min_interval=2,
                                max_interval=3)))
    mae = lt.tiny_mae(cfg)
    assert sorted(mae.readouts) == ["layer_1", "layer_2"]
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    mae.layerlock.attach_optimizer(opt)
    heads = []
    for step in range(12):
        mae.layerlock.begin_step(step)
        out = mae(lt.images(seed=step))
        heads.append(tuple(out.targets))
        out.loss.backward()
        mae.layerlock.end_step(out.loss, out.targets)
        opt.step()
        opt.zero_grad(set_to_none=True)
    decided = mae.layerlock.schedule.events()
    assert [d for _, d in decided] == [1, 2] and decided[0][0] >= 3 and decided[1][0] - decided[0][0] <= 3
    assert heads[0] == ("pixels",) and heads[-1] == ("layer_2",)
    assert mae.layerlock.state_dict()["schedule_state"]["events"]
