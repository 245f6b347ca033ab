"""VideoMAE pretraining with LayerLock under the Hugging Face Trainer: a ``run_mae``-style script.

    pip install -e ".[hf]"
    python examples/huggingface/pretrain_videomae_layerlock.py                          # LayerLock, ~1 min on CPU
    python examples/huggingface/pretrain_videomae_layerlock.py --method mae             # VideoMAE's own pixel target
    python examples/huggingface/pretrain_videomae_layerlock.py --stop-at 120            # stop at step 120 ...
    python examples/huggingface/pretrain_videomae_layerlock.py --resume                 # ... and resume exactly
    torchrun --nproc_per_node 2 examples/huggingface/pretrain_videomae_layerlock.py      # DDP (gloo on CPU)

The structure is that of a script built on ``VideoMAEForPreTraining`` + ``Trainer``: a config, a dataset of
``{"pixel_values": [T, C, H, W]}``, ``TrainingArguments``, ``trainer.train(resume_from_checkpoint=...)``.
Every line LayerLock adds or changes ends with ``# [LayerLock]``. The model is a tiny random-init VideoMAE
(4 blocks of width 64) on 8-frame 32x32 clips of the embedded moving-digits data, so nothing is downloaded.
At the end the encoder is saved with ``save_pretrained`` and loaded into ``VideoMAEForVideoClassification``.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments, VideoMAEConfig, VideoMAEForVideoClassification

from layerlock_plugin.adapters.huggingface import LayerLockTrainer, LayerLockVideoMAEForPreTraining  # [LayerLock]
from layerlock_plugin.controller import LayerLockConfig  # [LayerLock]
from layerlock_plugin.reference.data import DigitsVideoConfig, DigitsVideoDataset
from layerlock_plugin.schedule import ScheduleConfig  # [LayerLock]
from layerlock_plugin.warmup import WarmupConfig  # [LayerLock]


class VideoClips(Dataset):
    """The embedded moving-digits clips in transformers' layout: ``{"pixel_values": [T, C, H, W]}``."""

    def __init__(self, num_videos: int):
        self.data = DigitsVideoDataset(DigitsVideoConfig(num_videos=num_videos), "train")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.data[i]["video"].transpose(0, 1)}  # [C, T, H, W] -> [T, C, H, W]


class StopAt(TrainerCallback):
    """Ends training after step ``n`` (a checkpoint is written there): simulates a preempted job."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            control.should_save = control.should_training_stop = True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/hf-videomae")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--method", choices=["layerlock", "mae"], default="layerlock")
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = VideoMAEConfig(image_size=32, patch_size=8, num_channels=3, num_frames=8, tubelet_size=2, hidden_size=64,
                            num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, decoder_hidden_size=32,
                            decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                            use_mean_pooling=False, norm_pix_loss=True)
    torch.manual_seed(0)
    model = LayerLockVideoMAEForPreTraining(config)  # [LayerLock] was VideoMAEForPreTraining(config)
    steps = args.max_steps
    on_gpu, torchrun = torch.cuda.is_available(), int(os.environ.get("WORLD_SIZE", "1")) > 1
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, weight_decay=0.05, warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 10), save_strategy="steps", save_steps=max(1, steps // 5), report_to="none",
        seed=0, disable_tqdm=args.quiet, dataloader_pin_memory=on_gpu,
        use_cpu=not on_gpu, ddp_backend="gloo" if torchrun and not on_gpu else None)  # CPU torchrun: DDP over gloo
    layerlock = LayerLockConfig(  # [LayerLock] freeze a block every 15% of the run after a 40% pixel phase
        schedule=ScheduleConfig(pixel_steps=max(1, steps * 2 // 5), interval=max(1, steps * 3 // 20), max_frozen=3),  # [LayerLock]
        warmup=WarmupConfig(steps=max(1, steps // 30))).with_method(args.method)  # [LayerLock]
    trainer = LayerLockTrainer(model=model, args=training_args, train_dataset=VideoClips(num_videos=1024),  # [LayerLock]
                               layerlock=layerlock, mask_ratio=0.75, verbose=not args.quiet)  # [LayerLock]
    if args.stop_at is not None:
        trainer.add_callback(StopAt(args.stop_at))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    encoder_dir = os.path.join(args.output_dir, "encoder")
    trainer.save_encoder(encoder_dir)  # [LayerLock] VideoMAEModel weights for fine-tuning
    out = {"trainer": trainer, "model": model, "encoder_dir": encoder_dir}
    if trainer.is_world_process_zero() and (args.stop_at is None or args.stop_at >= steps):
        classifier, info = VideoMAEForVideoClassification.from_pretrained(encoder_dir, num_labels=8, output_loading_info=True)
        out.update(classifier=classifier, loading_info=info)
        if not args.quiet:
            print(f"encoder -> VideoMAEForVideoClassification: new {sorted(info['missing_keys'])}, "
                  f"unused {sorted(info['unexpected_keys'])}")
    return out


if __name__ == "__main__":
    main()
