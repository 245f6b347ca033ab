"""The evidence suite's calibration, coarsely (tiny sizes): the ladder the benchmark runs at full size
(``benchmarks/calibration.py --supervised multitask``) must already order the rungs here."""

from __future__ import annotations

import pytest
import torch

from layerlock_plugin.reference.config import OptimConfig
from layerlock_plugin.reference.data import DigitsVideoConfig, DigitsVideoDataset
from layerlock_plugin.reference.eval import ProbeConfig, run_probes
from layerlock_plugin.reference.eval.calibration import motion_tokens, pixel_tokens
from layerlock_plugin.reference.eval.calibration_rule import task_verdicts
from layerlock_plugin.reference.eval.supervised_multitask import train_multitask
from layerlock_plugin.reference.eval.threads import single_thread
from layerlock_plugin.reference.model import ModelConfig, VideoMAE

# the evidence suite's options on 16 px frames (6-8 px digits, 1 px/frame: the trajectory stays inside)
DATA = DigitsVideoConfig(num_videos=1024, num_test_videos=192, size=16, digit_size=(6.0, 8.0), speeds=(1.0,),
                         placement="inside", turn=90.0, digit_saturation=(0.0, 0.0), background_value=(0.2, 0.5),
                         standardize=True)
MODEL = ModelConfig(img_size=16, num_frames=8, tubelet=(2, 4, 4), embed_dim=32, depth=3, num_heads=2,
                    decoder_depth=1, mask_ratio=0.75)
PROBE = ProbeConfig(train_videos=192, test_videos=192, kinds=("attentive",), kind="attentive", steps=150,
                    weight_decay=1.0, l2=0.01)


@pytest.mark.timeout(600)
def test_coarse_calibration_orders_the_ladder_on_every_evidence_task():
    with single_thread():  # a model this small trains fastest on one thread (and far faster on a shared machine)
        _coarse_calibration()


def _coarse_calibration():
    torch.manual_seed(0)
    train, test = DigitsVideoDataset(DATA, "train", cache=True), DigitsVideoDataset(DATA, "test", cache=True)
    tasks = list(train.num_classes)
    assert tasks == ["motion", "appearance", "turn"]
    supervised = train_multitask(MODEL, train, tasks, steps=1000, batch_size=32, optim=OptimConfig(warmup_steps=60),
                                 lr=3e-3)

    def init(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return VideoMAE(MODEL).eval().encode

    rungs = [("pixels", pixel_tokens(MODEL.tubelet)), ("motion_features", motion_tokens(MODEL.tubelet)),
             ("random_init", init(0)), ("random_init", init(1)), ("supervised", supervised.encode)]
    ladder = [{"rung": kind, "probes": run_probes(enc, train, test, MODEL.grid, MODEL.tubelet, PROBE)}
              for kind, enc in rungs]
    verdicts = task_verdicts(ladder)
    scores = {t: (v["supervised"], v["best_baseline"], v["motion_features"]) for t, v in verdicts.items()}
    # hand-made motion features read the direction but not the turn; raw pixels and random init do not read
    # the turn; the supervised encoder reads the turn and the direction well above all of them
    assert ladder[1]["probes"]["motion_acc"] >= 0.7, scores
    assert ladder[1]["probes"]["turn_acc"] <= 0.75 and verdicts["turn"]["best_baseline"] <= 0.65, scores
    for task in ("motion", "turn"):
        assert verdicts[task]["passed"], (task, verdicts[task]["why"], scores)
    # digit identity and depth are learned too, if less far above the baselines at this size and budget (the
    # benchmark decides their calibration at full size)
    for task in ("appearance", "depth"):
        assert verdicts[task]["supervised"] > verdicts[task]["best_baseline"] + 0.03, (task, scores)
