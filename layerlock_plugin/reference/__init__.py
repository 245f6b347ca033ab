"""The reference trainer: a 4DS-style video ViT MAE pretrained with LayerLock, its data, probes and CLI.

The map, in call order: :mod:`.cli` (``layerlock-train``) reads a :class:`~.config.RunConfig` from
:mod:`.config` (YAML in ``configs/``, ``--set`` overrides; ``--dry-run`` goes to :mod:`.dryrun` for
sizes, FLOPs and memory) and runs :class:`~.train.Trainer` from :mod:`.train`, which holds the loop and
the step and one module per part of a run (run folder, budget, checkpointing, logs, metric sinks,
progress, throughput, optimizer, stop requests). The trainer builds the model from :mod:`.model` (ViT
MAE, 3D RoPE) and the clips from :mod:`.data` (embedded moving digits, video folders, batches as a
function of the step), and runs every step through the parallel seam in :mod:`.parallel` (process
groups, DDP / FSDP2 / XLA SPMD, distributed checkpoints; what differs between devices lives there). After
the last step it probes the frozen encoder with :mod:`.eval` (probes by kind, the suite, calibration)
and draws the run's figures with :mod:`.plots`. The LayerLock controller itself is the core package
above (:mod:`layerlock_plugin`), which imports nothing from here.
"""
