# Fine-tune the tiny LayerLock backbone with mmaction2's stock VideoMAE config (CPU, a few seconds).
#
#   python -m layerlock_plugin.adapters.mmaction.convert $LAYERLOCK_RUN/pretrain/iter_12.pth $LAYERLOCK_RUN/backbone.pth
#   python $TOOLS/train.py examples/mmaction2/finetune_vit-tiny_cpu.py      # -> $LAYERLOCK_RUN/finetune
#   python $TOOLS/test.py examples/mmaction2/finetune_vit-tiny_cpu.py $LAYERLOCK_RUN/finetune/epoch_1.pth
#
# The stock config brings the model (Recognizer3D: mmaction2's VisionTransformer + TimeSformerHead) and
# the test pipeline; this file shrinks the ViT to the tiny pretraining run's size and adds what the stock
# file leaves out for training (train pipeline, optimizer, schedule). For ViT-B/16 keep the stock sizes.
_base_ = ['mmaction::recognition/videomae/vit-base-p16_videomae-k400-pre_16x4x1_kinetics-400.py']
# Needed with the mmaction2 1.2.0 wheel: it makes `mmaction.models` importable (the wheel lacks the DRN
# localizer) and lets torch >= 2.6 load the epoch_N.pth checkpoints this run writes (tools/test.py).
custom_imports = dict(imports=['layerlock_plugin.adapters.mmaction'], allow_failed_imports=False)

run_dir = '{{$LAYERLOCK_RUN:runs/mmaction2_tiny}}'  # the pretraining example's folder (environment variable)
data_root = f'{run_dir}/data'
work_dir = f'{run_dir}/finetune'  # --work-dir overrides it
clip_len, img_size = 8, 32
load_from = f'{run_dir}/backbone.pth'  # the converted LayerLock backbone (only the classification head is missing)

model = dict(backbone=dict(img_size=img_size, embed_dims=64, depth=4, num_heads=4, num_frames=clip_len),
             cls_head=dict(in_channels=64, num_classes=2))

train_pipeline = [  # VideoMAE's fine-tuning augmentation at this size
    dict(type='DecordInit'), dict(type='SampleFrames', clip_len=clip_len, frame_interval=2, num_clips=1),
    dict(type='DecordDecode'), dict(type='RandomResizedCrop'),
    dict(type='Resize', scale=(img_size, img_size), keep_ratio=False), dict(type='Flip', flip_ratio=0.5),
    dict(type='FormatShape', input_format='NCTHW'), dict(type='PackActionInputs'),
]
test_pipeline = [
    dict(type='DecordInit'),
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=2, num_clips=2, test_mode=True),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, img_size)),
    dict(type='CenterCrop', crop_size=img_size),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='VideoDataset', ann_file=f'{data_root}/train_list.txt',
                 data_prefix=dict(video=f'{data_root}/videos'), pipeline=train_pipeline))
test_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(ann_file=f'{data_root}/train_list.txt', data_prefix=dict(video=f'{data_root}/videos'),
                 pipeline=test_pipeline))

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_begin=1, val_interval=1)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
                     paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [dict(type='CosineAnnealingLR', T_max=1, eta_min=1e-5, by_epoch=True, begin=0, end=1)]
default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
