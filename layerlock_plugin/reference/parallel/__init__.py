"""Where the reference trainer runs and how the model is spread over devices: the parallel seam.

:mod:`.distributed` picks the device and sets up the process group (torchrun's environment),
:mod:`.parallelize` wraps the model for the strategy (none, DDP, FSDP2, XLA SPMD) and holds everything
in a step that differs between devices (:class:`~.parallelize.Parallelized`), :mod:`.dcp` writes and
reads distributed checkpoints, :mod:`.xla` is the only module that imports ``torch_xla``.
"""
