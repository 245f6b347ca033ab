# LayerLock pretraining of a tiny mmaction2 VisionTransformer on a few generated mp4 clips (CPU, ~1 min).
#
#   export LAYERLOCK_RUN=runs/mmaction2_tiny    # the one folder this example writes into (this is the default)
#   python examples/mmaction2/make_tiny_clips.py                           # -> $LAYERLOCK_RUN/data
#   python $(python -c "import mmaction, os; print(os.path.dirname(mmaction.__file__))")/.mim/tools/train.py \
#       examples/mmaction2/layerlock_vit-tiny_cpu.py                      # -> $LAYERLOCK_RUN/pretrain
#
# Schedule (0-based iterations): pixels for 0-3, freeze stem + block 1 and switch the target to its
# output at 4, freeze block 2 and switch at 7; a 3-iteration LR warmup after each switch; 12 iterations.
custom_imports = dict(imports=['layerlock_plugin.adapters.mmaction'], allow_failed_imports=False)
default_scope = 'mmaction'

run_dir = '{{$LAYERLOCK_RUN:runs/mmaction2_tiny}}'  # mmengine substitutes the environment variable
data_root = f'{run_dir}/data'
work_dir = f'{run_dir}/pretrain'  # --work-dir overrides it
clip_len, img_size = 8, 32

model = dict(
    type='LayerLockVideoMAE',
    backbone=dict(type='VisionTransformer', img_size=img_size, patch_size=16, embed_dims=64, depth=4,
                  num_heads=4, mlp_ratio=4, qkv_bias=True, num_frames=clip_len,
                  norm_cfg=dict(type='LN', eps=1e-6)),
    decoder=dict(embed_dims=32, depth=1, num_heads=2),
    mask=dict(type='tube', ratio=0.75),
    data_preprocessor=dict(type='ActionDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], format_shape='NCTHW'))

custom_hooks = [
    dict(type='LayerLockHook',
         schedule=dict(pixel_steps=4, interval=3, jump=1, max_frozen=2),
         target=dict(kind='latent', mode='single'),
         warmup=dict(steps=3, start_factor=0.1),
         guard=dict(policy='warn', every=1)),
]

train_pipeline = [
    dict(type='DecordInit'),
    dict(type='SampleFrames', clip_len=clip_len, frame_interval=2, num_clips=1),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(-1, 36)),
    dict(type='CenterCrop', crop_size=img_size),
    dict(type='FormatShape', input_format='NCTHW'),
    dict(type='PackActionInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='VideoDataset', ann_file=f'{data_root}/train_list.txt',
                 data_prefix=dict(video=f'{data_root}/videos'), pipeline=train_pipeline))

train_cfg = dict(type='IterBasedTrainLoop', max_iters=12)
val_cfg = None
test_cfg = None

optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
    dict(type='CosineAnnealingLR', T_max=10, eta_min=1e-5, by_epoch=False, begin=2, end=12),
]

default_hooks = dict(
    runtime_info=dict(type='RuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1, ignore_last=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='ActionVisualizer', vis_backends=vis_backends)
log_level = 'INFO'
randomness = dict(seed=0, deterministic=False)
load_from = None
resume = False
