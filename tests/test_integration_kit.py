"""The integration kit (layerlock_plugin.integration) and the controller's public API that adapters use:
active heads, skipping a tripped step, DDP rebuilt alike, attached optimizers, the last decision and
targets, the layers a schedule can target, and the schedule protocol."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from layerlock_plugin.adaptive import read_recorded_events
from layerlock_plugin.collapse import GuardDecision
from layerlock_plugin.controller import LayerLock, LayerLockConfig
from layerlock_plugin.integration import DDPSync, LayerLockDDP, ddp_arguments, set_active_heads, skip_update
from layerlock_plugin.schedule import Schedule, ScheduleConfig
from layerlock_plugin.targets import TargetConfig

SCHED = ScheduleConfig(pixel_steps=2, interval=2, max_frozen=3)


def test_set_active_heads_switches_requires_grad_and_drops_grads():
    heads = nn.ModuleDict({"pixels": nn.Linear(2, 2), "layer_1": nn.Linear(2, 2)})
    for p in heads.parameters():
        p.grad = torch.ones_like(p)
    assert set_active_heads(heads, ["layer_1"]) is True
    assert all(not p.requires_grad and p.grad is None for p in heads["pixels"].parameters())
    assert all(p.requires_grad and p.grad is not None for p in heads["layer_1"].parameters())
    assert set_active_heads(heads, ["layer_1"]) is False  # nothing changed
    with pytest.raises(KeyError, match=r"no readout for heads \['layer_9'\]"):
        set_active_heads(heads, ["layer_9"])


def test_skip_update_makes_the_step_a_no_op():
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.ones(3)
    assert skip_update(GuardDecision(), opt) is False and w.grad is not None
    assert skip_update(GuardDecision(tripped=True, skip=True), opt) is True
    opt.step()
    assert torch.equal(w, torch.ones(3)) and w not in opt.state  # not even weight decay or a step count


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_is_rebuilt_alike_when_the_trainable_set_changes(one_process_group):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ddp = DistributedDataParallel(model, static_graph=True, bucket_cap_mb=1, gradient_as_bucket_view=True)
    sync = DDPSync(ddp)
    assert not sync.stale
    for p in model[0].parameters():
        p.requires_grad_(False)
    assert sync.stale
    old = ddp_arguments(ddp)
    del ddp
    new = sync.rebuild()
    assert type(new) is DistributedDataParallel and new.module is model and not sync.stale and sync.rebuilds == 1
    assert ddp_arguments(new) == old and new.static_graph
    # the drop-in wrapper: rebuilds on the next forward, keeps DDP's state_dict keys
    wrapped = LayerLockDDP(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    wrapped(torch.randn(2, 4)).sum().backward()
    for p in wrapped.module[0].parameters():
        p.requires_grad_(False)
    wrapped(torch.randn(2, 4)).sum().backward()
    assert wrapped.rebuilds == 1 and list(wrapped.state_dict())[0].startswith("module.")


def test_controller_public_api_for_adapters(toy_encoder):
    ll = LayerLock(toy_encoder, LayerLockConfig(schedule=SCHED), tubelet=(1, 1, 8))
    opt = torch.optim.SGD(toy_encoder.parameters(), lr=0.1)
    ll.attach_optimizer(opt)
    ll.attach_optimizer(opt)  # attached once
    assert ll.optimizers == (opt,)
    assert ll.readout_layers() == [1, 2, 3] and ll.target_layers() == []
    ll.begin_step(4)
    assert ll.target_layers() == [2] and ll.heads() == ["layer_2"]
    x, query = torch.randn(2, 6, 8), torch.tensor([[0, 3], [1, 5]])
    targets = ll.targets(x, None, query)
    assert ll.last_targets is targets and targets["layer_2"].shape == (2, 2, 16)
    # the guard on targets a host computed itself (a list of [B, K, D], e.g. one per mask)
    decision = ll.end_step(torch.tensor(float("nan")), [targets["layer_2"], targets["layer_2"][:, :1]])
    assert decision.tripped and ll.last_decision is decision
    ll.begin_step(5)  # a new step forgets the previous step's decision and targets
    assert not ll.last_decision.tripped and ll.last_targets is None


@pytest.mark.parametrize("mode, kind, expected", [("single", "latent", [1, 2, 3]), ("multi", "latent", [1, 2, 3]),
                                                  ("single", "pixels", [])])
def test_readout_layers(toy_encoder, mode, kind, expected):
    sched = ScheduleConfig(pixel_steps=2, interval=2, jump=2, max_frozen=3)  # depths 2, 3
    ll = LayerLock(toy_encoder, LayerLockConfig(schedule=sched, target=TargetConfig(mode=mode, kind=kind)))
    assert ll.readout_layers() == ([2, 3] if (mode, kind) == ("single", "latent") else expected)


def test_effective_plan_target_layer_is_the_target_block(toy_encoder):
    """target_layer says which block is the target: 0 for pixel-target methods, the schedule's depth for
    latent-naive (which freezes nothing)."""
    for method, frozen, target in (("layerlock", 2, 2), ("freeze-only", 2, 0), ("latent-naive", 0, 2), ("mae", 0, 0)):
        ll = LayerLock(toy_encoder.__class__(), LayerLockConfig(schedule=SCHED).with_method(method))
        plan = ll.plan_at(4)
        assert (plan.num_frozen, plan.target_layer) == (frozen, target), method


def test_recorded_events_of_every_baseline_replay(tmp_path):
    rows = [{"step": 2, "num_frozen": 1, "target_layer": 0}, {"step": 4, "num_frozen": 2, "target_layer": 0}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # freeze-only
    assert read_recorded_events(tmp_path) == [(2, 1), (4, 2)]


class EveryStep(Schedule):
    """A custom schedule through the protocol: an event at every observed step after the first."""

    def __init__(self):
        super().__init__([], [], 4, True)
        self.depths = (1, 2, 3)
        self.seen = []

    def observe(self, step):
        self.seen.append(step)
        if step > 0 and len(self.event_steps) < 3:
            self.event_steps = (*self.event_steps, step)

    def describe(self):  # what must match on resume: not the decided steps, they are state
        return {"kind": "every-step", "depths": list(self.depths)}

    def reason(self, stage):
        return f"custom {stage}"

    def metrics(self):
        return {"layerlock/custom/observed": float(len(self.seen))}

    def state_dict(self):
        return {"event_steps": list(self.event_steps)}

    def load_state_dict(self, state, next_step):
        self.event_steps = tuple(state["event_steps"])


def test_the_controller_drives_any_schedule_through_the_protocol(toy_encoder):
    events = []
    ll = LayerLock(toy_encoder, LayerLockConfig(schedule=SCHED), schedule=EveryStep())
    ll.on_event(events.append)
    for step in range(3):
        ll.begin_step(step)
    assert ll.schedule.seen == [0, 1, 2] and [e.reason for e in events] == ["custom 1", "custom 2"]
    assert ll.metrics()["layerlock/custom/observed"] == 3.0
    state = ll.state_dict()
    assert state["schedule_state"] == {"event_steps": [1, 2]}
    fresh = LayerLock(toy_encoder.__class__(), LayerLockConfig(schedule=SCHED), schedule=EveryStep())
    fresh.load_state_dict(state)
    assert fresh.plan.num_frozen == 2


def test_explicit_schedule_state_is_empty_and_old_states_without_it_load(toy_encoder):
    ll = LayerLock(toy_encoder, LayerLockConfig(schedule=SCHED))
    ll.begin_step(3)
    state = ll.state_dict()
    assert state["schedule_state"] == {}
    del state["schedule_state"]  # written before the schedule protocol
    fresh = LayerLock(toy_encoder.__class__(), LayerLockConfig(schedule=SCHED))
    fresh.load_state_dict(state)
    assert fresh.plan.num_frozen == 1
