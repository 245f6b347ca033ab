# LayerLock pretraining of mmaction2's ViT-B/16 (VideoMAE architecture) on Kinetics-400, 16x4x1 clips.
#
#   bash $(python -c "import mmaction, os; print(os.path.dirname(mmaction.__file__))")/.mim/tools/dist_train.sh \
#       examples/mmaction2/layerlock_vit-base-p16_k400_16x4x1.py 8 --work-dir work_dirs/layerlock_vit-b_k400
#   python -m layerlock_plugin.adapters.mmaction.convert work_dirs/layerlock_vit-b_k400/iter_200000.pth vit-b_layerlock.pth
#   # then fine-tune with the stock configs/recognition/videomae/vit-base-p16_videomae-k400-pre_16x4x1_kinetics-400.py
#   # as finetune_vit-tiny_cpu.py does (custom_imports + a train pipeline / optimizer), load_from='vit-b_layerlock.pth'
#
# LayerLock's part is three entries: custom_imports, the LayerLockVideoMAE model (its decoder and mask
# default to VideoMAE's ViT-B decoder and 90% tube masking) and the LayerLockHook with the schedule.
# Everything else is mmaction2's own: the runtime comes from its _base_ (needs setuptools < 82, which the
# plugin's mmaction extra installs).
_base_ = ['mmaction::_base_/default_runtime.py']
#
# The paper's ViT-G schedule, scaled to this run's length (fractions of the run kept):
#   paper: 500K steps; pixels for 160K (32%); then every 10K steps freeze the next of 48 blocks and
#          switch the target to it, until 32 = 2/3 of the blocks are frozen (last event at 470K, 94%).
#   here:  200K iterations (8 GPUs x 32 clips = 256 per step); pixels for 64K (32%); 8 = 2/3 of 12
#          blocks, events every 17.7K iterations (64K + 7 x 17.7K = 187.9K, 94%); a 3.5K-iteration LR
#          warmup after each switch (20% of an interval, as in the plugin's reference config).
custom_imports = dict(imports=['layerlock_plugin.adapters.mmaction'], allow_failed_imports=False)

max_iters = 200_000
data_root = 'data/kinetics400/videos_train'
ann_file_train = 'data/kinetics400/kinetics400_train_list_videos.txt'

model = dict(
    type='LayerLockVideoMAE',
    backbone=dict(type='VisionTransformer', img_size=224, patch_size=16, embed_dims=768, depth=12,
                  num_heads=12, mlp_ratio=4, qkv_bias=True, num_frames=16,
                  norm_cfg=dict(type='LN', eps=1e-6)))  # exactly the stock VideoMAE fine-tuning backbone
custom_hooks = [dict(type='LayerLockHook', schedule=dict(pixel_steps=64_000, interval=17_700, max_frozen=8),
                     warmup=dict(steps=3_500), guard=dict(every=100))]

train_pipeline = [
    dict(type='DecordInit'),
    dict(type='SampleFrames', clip_len=16, frame_interval=4, num_clips=1),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, 256)),
    dict(type='MultiScaleCrop', input_size=224, scales=(1, .875, .75, .66), random_crop=False, max_wh_scale_gap=1),
    dict(type='Resize', scale=(224, 224), keep_ratio=False),
    dict(type='Flip', flip_ratio=0.5),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs'),
]
train_dataloader = dict(
    batch_size=32, num_workers=8, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='VideoDataset', ann_file=ann_file_train, data_prefix=dict(video=data_root),
                 pipeline=train_pipeline))

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
val_cfg = None
test_cfg = None

# VideoMAE's optimizer: AdamW, lr 1.5e-4 per 256 clips, betas (0.9, 0.95), weight decay 0.05,
# linear warmup over 5% of the run, then cosine. Add --amp to tools/train.py for mixed precision.
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=10_000),
    dict(type='CosineAnnealingLR', T_max=max_iters - 10_000, eta_min=1e-6, by_epoch=False,
         begin=10_000, end=max_iters),
]
auto_scale_lr = dict(enable=False, base_batch_size=256)

default_hooks = dict(logger=dict(interval=50),
                     checkpoint=dict(interval=5_000, by_epoch=False, max_keep_ckpts=3, save_best=None))
log_processor = dict(window_size=50, by_epoch=False)
# layerlock/* scalars reach every backend; add dict(type='TensorboardVisBackend') with tensorboard installed.
