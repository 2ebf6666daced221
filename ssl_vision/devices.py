"""What a run sets up for the hardware it trains on: GPU speed defaults and the DDP strategy.

CPU runs are unchanged by everything here except the DDP strategy (which is the same on any device).

- ``trainer.benchmark: null`` -> cuDNN autotuning on GPUs (``torch.backends.cudnn.benchmark``): each
  convolution shape is timed once and its fastest algorithm kept; a run has a handful of shapes (one per
  view size), so the few seconds it costs at the start pay back. Not with ``trainer.deterministic``.
- ``tf32: true`` with ``trainer.precision=32-true`` on GPUs: float32 matmuls on TF32 tensor cores
  (``torch.set_float32_matmul_precision("high")``; Ampere and newer), as cuDNN already does for
  convolutions by default. Mixed precision does not need it.
- ``backbone.channels_last: null`` -> NHWC weights and views for convolutional backbones on GPUs (the
  tensor-core convolution layout), left off on CPUs (``backbones.py``). ViT presets have no such key.
- ``trainer.strategy`` ``ddp`` (and its ``ddp_*`` variants): DDP without the buffer copy before every
  forward (``forward_sync_buffers=False``; ``broadcast_buffers=False`` before torch added that, which also
  skips the one copy at start). DDP would otherwise copy every buffer from rank 0 before each forward -
  the MoCo v2 queue (65536 x 128 x 2 floats, 64 MiB) every step. Our buffers need no such copy: the
  queue and its pointer are identical on every rank by construction (every rank writes the same
  all-gathered keys at the same pointer; ``MoCoV2`` also broadcasts them once at fit start), and
  BatchNorm running statistics are never read in training (BN in training mode normalizes with batch
  statistics); SyncBatchNorm keeps them identical, and where ranks keep their own (CPU, the online
  probe), validation and evaluation first take rank 0's, which are the ones a checkpoint holds
  (``SSLMethod.on_validation_epoch_start``, ``evaluation.evaluate_backbone``).
"""

from __future__ import annotations

import inspect

import torch


def trains_on_gpu(trainer_kwargs: dict) -> bool:
    accelerator = trainer_kwargs.get("accelerator", "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def apply_device_defaults(cfg, gpu: bool) -> None:
    """Before the model is built: resolve ``backbone.channels_last: null`` and set TF32 for 32-true on GPUs."""
    if "channels_last" in cfg.backbone and cfg.backbone.channels_last is None:
        cfg.backbone.channels_last = gpu
    if gpu and bool(cfg.get("tf32", True)) and str(cfg.trainer.get("precision", "32-true")) in ("32-true", "32"):
        torch.set_float32_matmul_precision("high")


def device_trainer_kwargs(kwargs: dict, gpu: bool) -> dict:
    """The Trainer's keyword arguments with the device defaults filled in (see the module docstring)."""
    kwargs = dict(kwargs)
    if gpu and kwargs.get("benchmark") is None and not kwargs.get("deterministic"):
        kwargs["benchmark"] = True
    kwargs["strategy"] = ddp_without_buffer_broadcast(kwargs.get("strategy", "auto"))
    return kwargs


def ddp_without_buffer_broadcast(strategy):
    """``ddp`` / ``ddp_*`` strategy names as a ``DDPStrategy`` that does not copy buffers before each forward;
    any other strategy (``auto``, ``fsdp``, an object) is returned as given."""
    if not isinstance(strategy, str):
        return strategy
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    entry = dict.get(StrategyRegistry, strategy)  # the registry's own .get builds the strategy
    if entry is None or entry["strategy"] is not DDPStrategy:
        return strategy
    ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_args else {"broadcast_buffers": False}
    return DDPStrategy(**entry["init_params"], **no_sync)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine() or device.type
