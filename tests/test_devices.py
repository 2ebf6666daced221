"""ssl_vision/devices.py: GPU speed defaults (CPU runs unchanged) and DDP without per-forward buffer copies;
the online probe's BatchNorm stays out of SyncBatchNorm."""

import inspect

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from ssl_vision.devices import apply_device_defaults, ddp_without_buffer_broadcast, device_trainer_kwargs
from ssl_vision.methods import build_method
from ssl_vision.methods.base import LocalBatchNorm1d


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_gpu_defaults_and_unchanged_cpu_runs(make_cfg, matmul_precision):
    torch.set_float32_matmul_precision("highest")
    cpu = make_cfg("backbone=resnet50")
    apply_device_defaults(cpu, gpu=False)
    assert cpu.backbone.channels_last is False and torch.get_float32_matmul_precision() == "highest"
    tiny = make_cfg("backbone=resnet18_tiny")  # its preset asks for NHWC on any device
    apply_device_defaults(tiny, gpu=False)
    assert tiny.backbone.channels_last is True
    gpu = make_cfg("backbone=resnet50")
    apply_device_defaults(gpu, gpu=True)
    assert gpu.backbone.channels_last is True and torch.get_float32_matmul_precision() == "high"
    vit = make_cfg("backbone=vit_small")
    apply_device_defaults(vit, gpu=True)
    assert "channels_last" not in vit.backbone  # ViTs keep their layout
    torch.set_float32_matmul_precision("highest")
    for overrides in (["trainer.precision=bf16-mixed"], ["tf32=false"]):  # TF32 only for 32-true, on request
        apply_device_defaults(make_cfg(*overrides), gpu=True)
        assert torch.get_float32_matmul_precision() == "highest", overrides
    explicit = make_cfg("backbone=resnet50", "backbone.channels_last=false")
    apply_device_defaults(explicit, gpu=True)
    assert explicit.backbone.channels_last is False  # an explicit choice wins

    assert device_trainer_kwargs({"benchmark": None}, gpu=True)["benchmark"] is True
    assert device_trainer_kwargs({"benchmark": None}, gpu=False)["benchmark"] is None
    assert device_trainer_kwargs({"benchmark": None, "deterministic": True}, gpu=True)["benchmark"] is None
    assert device_trainer_kwargs({"benchmark": False}, gpu=True)["benchmark"] is False


def test_ddp_strategies_copy_no_buffers_before_each_forward():
    ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    flag = "forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers"
    strategy = ddp_without_buffer_broadcast("ddp")
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs == {flag: False}
    assert strategy._start_method == "popen"
    unused = ddp_without_buffer_broadcast("ddp_find_unused_parameters_true")
    assert unused._ddp_kwargs == {"find_unused_parameters": True, flag: False}
    assert ddp_without_buffer_broadcast("auto") == "auto" and ddp_without_buffer_broadcast("fsdp") == "fsdp"
    assert device_trainer_kwargs({"strategy": "ddp"}, gpu=False)["strategy"]._ddp_kwargs == {flag: False}


def test_probe_batchnorm_is_batchnorm1d_and_stays_out_of_sync_batchnorm(make_cfg):
    """LocalBatchNorm1d computes what nn.BatchNorm1d(affine=False) does (train and eval, running statistics,
    state-dict keys: old checkpoints load), and SyncBatchNorm conversion - what trainer.sync_batchnorm does
    to the whole model - converts the method's BatchNorms but not the probe's."""
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm1d(5, affine=False), LocalBatchNorm1d(5)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for _ in range(3):
        x = torch.randn(8, 5) * 3 + 1
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    for key, value in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[key].float(), value.float()), key
    ours.eval(), ref.eval()
    x = torch.randn(4, 5)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)
    fresh = LocalBatchNorm1d(5)
    fresh.load_state_dict(ref.state_dict())

    model = build_method(make_cfg("data=synthetic", "backbone=resnet18_tiny", "method=simclr"), num_classes=4)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced.probe[0], LocalBatchNorm1d)
    assert isinstance(synced.backbone.bn1, nn.SyncBatchNorm)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.projector.modules())
