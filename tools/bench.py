"""Cost of each method's training step against its backbone's own cost (the "floor").

    python tools/bench.py --quick          # every method: ResNet-18 / ViT-Tiny / ViT-Small at 32 px
    python tools/bench.py --image-size 224 --batch-size 128 --methods simclr moco_v3 mae:vit_base
    python tools/bench.py --methods simclr:resnet18_tiny --image-size 16 --batch-size 8 --out tiny.json
    python tools/bench.py --image-size 224 --batch-size 256 trainer.precision=bf16-mixed   # Hydra overrides

For each method and backbone, in this process, on one device (``--device``; auto: the GPU if any):

- step_ms: one iteration of a real ``lightning.Trainer`` fit (``build_method`` as train.py does,
  ``data=synthetic``), timed from one ``on_train_batch_end`` to the next: batch fetch and transfer,
  on-device augmentation, heads, loss, online probe, backward, optimizer and scheduler step,
  EMA / queue update, Lightning's logging. images_per_second = batch_size / step.
- flops_per_image (GFLOPs/img): the first training step's matmul / convolution / attention FLOPs, forward
  and backward, per image (``ssl_vision.callbacks.Throughput``: every view, heads, momentum encoder, probe).
- floor_ms: the backbone alone, forward + ``.sum().backward()``, on exactly the views the method
  trained on in that step: SimCLR one call on the 2B concatenated views; MoCo v2/v3 one call per view
  plus the momentum backbone's no-grad forward of each view; MAE the ViT's full-token forward of the
  B images; BYOL as MoCo (online backbone per view + target backbone no-grad); SimSiam, Barlow Twins,
  VICReg the backbone per view; DINO the student backbone on every crop (one call per crop size) + the
  teacher backbone's no-grad forward of the global views. No augmentation, heads, loss or optimizer step.
  It runs between the Trainer's steps (outside their timed intervals), so floor and step alternate and
  a busy machine's drift hits both.
- augment_images_per_second: ``model.augment`` alone on a uint8 batch, every view counted.
- peak_memory_mb over the fit: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the growth of
  the process's peak RSS over its RSS before the fit (``memory_kind`` says which).
- MAE also: masked_ms, the encoder on the visible tokens only (``model.encode``) forward + backward,
  and masked_over_full = masked_ms / floor_ms; its step_ms includes the decoder and the probe, so
  MAE's step_over_floor is not a measure of overhead: network_ms times the encoder on the visible
  tokens plus the decoder, forward + backward, and step_over_network = step_ms / network_ms is what
  the rest of the step (loss, augmentation, the online probe's no-grad full-image forward,
  optimizer, logging) adds on top of MAE's own networks.
- BYOL, DINO, SimSiam, Barlow Twins, VICReg also: network_ms, the method's own networks (backbone and
  heads: projector, predictor, DINO head) forward + backward on every view they see, plus the target /
  teacher networks' no-grad forward where there is one (the method's ``network_floor``), and
  step_over_network = step_ms / network_ms, as for MAE: what the loss, augmentation, online probe,
  optimizer, EMA and logging add on top of the networks the method cannot do without.

- host_syncs_per_step: the points of one more training iteration (after the timed ones, itself
  untimed) where the host waits for a device value, by whose code asked for it. That iteration runs
  the code a GPU runs: LARS with device-scalar trust ratios (its CPU path reads them on the host). On the CPU a
  ``TorchDispatchMode`` counts the operations that need one on a GPU (``_local_scalar_dense``, i.e.
  ``.item()`` / ``int()`` / ``bool()`` / ``if tensor``; ``nonzero``; boolean-mask indexing; ``unique``...);
  on a GPU ``torch.cuda.set_sync_debug_mode`` reports every synchronizing call (these, and blocking
  host<->device copies such as a Python number turned into a GPU tensor). Each is attributed by the
  Python stack: ``step`` (the training step and optimizer hooks of ``ssl_vision``: the hot path, which
  must have none), ``augment`` (``on_after_batch_transfer``, the on-device augmentation), ``data`` (the
  loader), ``callbacks`` (``ssl_vision`` callbacks) or ``lightning`` (Lightning's own, e.g. the logger
  every ``log_every_n_steps``). host_sync_sites lists the ``ssl_vision`` line of each.

Every time is the median of ``--repeats`` timings after ``--warmup`` untimed ones (the floor and
masked references: after one, at the end of the warm-up steps); the raw timings are in the JSON
(``*_samples_ms``). The synthetic loader runs in the training process (``data.num_workers=0``), so
step_ms includes the batch fetch; add e.g. ``data.num_workers=4`` on a GPU machine to overlap it.
On a CPU shared with other jobs, ``--threads 1`` gives steadier figures: each multi-threaded op
otherwise waits for its second thread to be scheduled (Kornia's thousands of small ops most).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import math
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_vision.backbones import resolve_patch_size
from ssl_vision.callbacks import Throughput
from ssl_vision.config import conf_dir
from ssl_vision.data import SSLDataModule
from ssl_vision.devices import apply_device_defaults, device_name, device_trainer_kwargs
from ssl_vision.methods import METHODS, build_method
from ssl_vision.optim import LARS

DEFAULT_RUNS = [("simclr", "resnet18"), ("moco_v2", "resnet18"), ("moco_v3", "resnet18"),
                ("mae", "vit_tiny"), ("mae", "vit_small"), ("byol", "resnet18"), ("dino", "resnet18"),
                ("simsiam", "resnet18"), ("barlow_twins", "resnet18"), ("vicreg", "resnet18")]
FLOOR = {
    "simclr": "backbone fwd+bwd on the 2B concatenated views (one call)",
    "moco_v2": "backbone fwd+bwd per view + momentum backbone no-grad fwd per view",
    "mae": "ViT full-token fwd+bwd of the B images",
}
FLOOR["moco_v3"] = FLOOR["byol"] = FLOOR["moco_v2"]
FLOOR["simsiam"] = FLOOR["barlow_twins"] = FLOOR["vicreg"] = "backbone fwd+bwd per view"
FLOOR["dino"] = ("student backbone fwd+bwd on every crop (one call per size) + teacher backbone no-grad fwd on "
                 "the globals")
NETWORK = {  # what network_ms times (step_over_network = step_ms / network_ms)
    "mae": "ViT encoder on the visible tokens + decoder fwd+bwd",
    "byol": "online backbone + projector + predictor fwd+bwd per view + target backbone + projector no-grad fwd",
    "simsiam": "backbone + projector + predictor fwd+bwd per view",
    "barlow_twins": "backbone + projector fwd+bwd per view",
    "vicreg": "backbone + expander fwd+bwd per view",
    "dino": "student backbone + DINO head fwd+bwd on every crop + teacher backbone + head no-grad fwd on the globals",
}
QUEUE_BATCHES = 16  # MoCo v2's queue holds this many batches


def compose_cfg(method: str, backbone: str, image_size: int, batch_size: int, steps: int, patch_size="auto",
                extra=()):
    """The real training config (``compose("train", ...)``) on synthetic data with one epoch of >= ``steps``;
    ``extra``: more Hydra overrides, e.g. ``trainer.precision=bf16-mixed``."""
    overrides = [f"method={method}", f"backbone={backbone}", "data=synthetic", f"data.image_size={image_size}",
                 f"data.canvas_size={image_size}", f"data.batch_size={batch_size}"]
    if method == "moco_v2":
        overrides.append(f"method.queue_size={QUEUE_BATCHES * batch_size}")
    if backbone.startswith("vit"):
        overrides.append(f"backbone.patch_size={patch_size}")
    if method == "dino":  # local crops at the paper's 96 / 224 of the global size (dino.yaml's 96 px is for 224)
        step = resolve_patch_size(patch_size, image_size) if backbone.startswith(("vit", "deit")) else 2
        local = max(step, step * round(image_size * 96 / 224 / step))  # a ViT's: whole patches
        overrides += [f"augment.views.local{i}.size={local}" for i in range(1, 9)]
        if step != 2:
            overrides.append("+backbone.kwargs.dynamic_img_size=true")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="train", overrides=overrides + list(extra))
    # enough images that every step falls in the first epoch (no epoch end inside the timed steps)
    # and, for MoCo v2, that the queue is not larger than the data (which only logs a warning)
    batches = max(steps + 1, QUEUE_BATCHES if method == "moco_v2" else 0)
    train_fraction = 1.0 - float(cfg.data.val_fraction)
    cfg.data.num_samples = math.ceil(batch_size * batches / train_fraction) + 2 * int(cfg.data.num_classes)
    return cfg


# --- host syncs ---------------------------------------------------------------------------------------
# operations whose result (or output shape) the host must read from the device before it can go on
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc"}
MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}  # boolean masks run nonzero inside
CATEGORIES = ("step", "augment", "data", "callbacks", "optimizer", "lightning", "other")


def _needs_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in MASK_INDEXED and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if name == "repeat_interleave":  # tensor repeats: the output size is read from them unless given
        repeats = args[0] if func._overloadname == "Tensor" else (args[1] if len(args) > 1 else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


def _site(frame) -> str:
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno} ({frame.f_code.co_name})"


def attribute(frame) -> tuple[str, str]:
    """(category, site) of a sync whose innermost Python frame is ``frame``.

    The innermost frame outside the libraries (torch, Kornia, timm, torchmetrics, ...) decides whose code
    asked: ``lightning`` for Lightning's; for ``ssl_vision``'s, the hook that Lightning called (the outermost
    ``ssl_vision`` frame inside ``trainer.fit``) gives the category - ``augment`` (the batch transfer hooks,
    ``augment.py``), ``data`` (the loader's collate: host tensors, never a device sync), ``callbacks``, or
    ``step`` (training step, optimizer hooks, losses: the hot path). ``optimizer``: inside ``torch.optim``,
    whose ``step`` counters stay on the host unless ``capturable`` (no device sync on a GPU either).
    """
    stack = []  # innermost first
    while frame is not None:
        stack.append((frame.f_globals.get("__name__", ""), frame))
        frame = frame.f_back
    for i, (module, f) in enumerate(stack):
        if module.startswith("torch.optim"):
            return "optimizer", _site(f)
        root = module.split(".")[0]
        if root == "lightning":
            return "lightning", _site(f)
        if root != "ssl_vision":
            continue
        outer = [m for m, _ in stack[i:]]
        fit = max((j for j, m in enumerate(outer) if m.split(".")[0] == "lightning"), default=len(outer))
        hook_module, hook = next((m, f) for m, f in reversed(stack[i:i + fit]) if m.split(".")[0] == "ssl_vision")
        name = hook.f_code.co_name
        if name in ("on_after_batch_transfer", "on_before_batch_transfer") or hook_module == "ssl_vision.augment":
            return "augment", _site(f)
        if hook_module.startswith("ssl_vision.data"):
            return "data", _site(f)
        if hook_module == "ssl_vision.callbacks":
            return "callbacks", _site(f)
        return "step", _site(f)
    return "other", _site(stack[0][1]) if stack else ""


class HostSyncCounter(TorchDispatchMode):
    """Counts host syncs in its window (``start``/``stop``), attributed with ``attribute``.

    CPU: the operations of ``SYNC_OPS`` (and boolean-mask indexing) seen by this dispatch mode - the ones
    that would wait for a GPU. CUDA: ``torch.cuda.set_sync_debug_mode("warn")``, whose warnings name every
    synchronizing call, blocking copies included (the dispatch mode is not used there: no double count).
    """

    def __init__(self, cuda: bool):
        super().__init__()
        self.cuda = cuda
        self.events: list[tuple[str, str, str]] = []  # (category, what, site)
        self._saved = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _needs_sync(func, args, kwargs):
            category, site = attribute(sys._getframe(1))
            self.events.append((category, f"aten.{func.overloadpacket.__name__}", site))
        return func(*args, **kwargs)

    def _on_warning(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            where, site = attribute(sys._getframe(1))
            self.events.append((where, "cuda sync", site))
        else:
            self._show(message, category, filename, lineno, file, line)

    def start(self) -> None:
        if not self.cuda:
            self.__enter__()
            return
        self._saved = (torch.cuda.get_sync_debug_mode(), warnings.catch_warnings())
        self._saved[1].__enter__()  # restores the filters and showwarning at stop
        warnings.simplefilter("always")  # every occurrence, not once per call site
        self._show, warnings.showwarning = warnings.showwarning, self._on_warning
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if not self.cuda:
            self.__exit__(None, None, None)
            return
        torch.cuda.set_sync_debug_mode(self._saved[0])
        self._saved[1].__exit__(None, None, None)

    def summary(self) -> tuple[dict, list[str]]:
        counts = collections.Counter(c for c, _, _ in self.events)
        sites = sorted({f"{c}: {site} {what}" for c, what, site in self.events})
        return {c: counts.get(c, 0) for c in CATEGORIES}, sites


class StepTimer(L.Callback):
    """Times every training iteration, from one ``on_train_batch_end`` to the next, and between the
    iterations (outside their intervals) the ``reference_fns`` on the views that iteration trained on:
    step and floor alternate, so a shared machine's slow drift hits both alike. The references start
    after step ``first_reference``: one warm-up call is enough for a backbone the steps have warmed.
    Iteration ``count_step`` is neither timed nor followed by references: ``counter`` counts its host
    syncs, from the end of the previous iteration's hooks (its batch fetch and augmentation included)
    to the start of its own ``on_train_batch_end``."""

    def __init__(self, cuda: bool, method: str, first_reference: int = 0, count_step: int | None = None,
                 counter: HostSyncCounter | None = None):
        self.cuda, self.method, self.first_reference = cuda, method, first_reference
        self.count_step, self.counter = count_step, counter
        self.times: dict[str, list[float]] = {"step": []}
        self._last = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.count_step:
            self.counter.stop()
            return
        now = self._now()
        if self._last is not None:
            self.times["step"].append((now - self._last) * 1e3)
        references = reference_fns(pl_module, self.method, batch[0]) if batch_idx >= self.first_reference else {}
        for name, fn in references.items():
            start = self._now()
            with trainer.precision_plugin.train_step_context():  # the step's precision (autocast)
                fn()
            self.times.setdefault(name, []).append((self._now() - start) * 1e3)
        self._last = self._now()  # the next step's grads are zeroed by Lightning before its backward
        if self.counter is not None and batch_idx + 1 == self.count_step:
            for opt in trainer.optimizers:  # count the path a GPU runs: LARS's host trust ratios are CPU-only
                if isinstance(opt, LARS):
                    opt.host_scalars = False
            self.counter.start()


def time_ms(fn, warmup: int, repeats: int, cuda: bool) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def memory_start(device: torch.device) -> tuple[float, str]:
    """Start a peak-memory measurement; returns (baseline MiB, memory_kind)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0, "cuda_max_memory_allocated"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand freed heap back, so reuse counts as growth
    except (OSError, AttributeError):
        pass
    try:  # Linux: reset the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mb("VmRSS"), "cpu_peak_rss_growth"
    except OSError:  # no reset: growth of the lifetime peak, a lower bound when an earlier run peaked higher
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_ru_maxrss_growth"


def memory_peak_mb(device: torch.device, baseline: float, kind: str) -> float:
    """Peak MiB since ``memory_start``: CUDA allocations, or the peak RSS above ``baseline``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM") if kind == "cpu_peak_rss_growth" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(0.0, peak - baseline)


def reference_fns(model, method: str, views: list[torch.Tensor]) -> dict:
    """Closures of the backbone-only work of one step on ``views`` (see ``FLOOR``): ``floor``; for
    MAE ``masked``, its encoder on the visible tokens only (``model.encode``), forward + backward, and
    ``network``, that encoder plus the decoder (``model.decode``), forward + backward; for the methods
    with a ``network_floor`` (``NETWORK``), ``network``: that, backbone and heads on every view they see."""
    if method == "dino":  # self.backbone is DINO's teacher; the student sees every crop
        return dino_reference_fns(model, views)
    backbone, views = model.backbone, views[: 1 if method == "mae" else 2]

    def floor():
        backbone.zero_grad(set_to_none=True)
        if method == "simclr":
            backbone(torch.cat(views)).sum().backward()
            return
        sum(backbone(v).sum() for v in views).backward()
        if hasattr(model, "momentum_backbone"):  # MoCo's key encoder, BYOL's target
            with torch.no_grad():
                for v in views:
                    model.momentum_backbone(v)

    def masked():
        backbone.zero_grad(set_to_none=True)
        model.encode(views[0], float(model.cfg.method.mask_ratio))[0].sum().backward()

    def network():
        model.zero_grad(set_to_none=True)
        latent, _, ids_restore = model.encode(views[0], float(model.cfg.method.mask_ratio))
        model.decode(latent, ids_restore).sum().backward()

    if method == "mae":
        return {"floor": floor, "masked": masked, "network": network}
    return {"floor": floor, **own_networks(model, views)}


def own_networks(model, views: list[torch.Tensor]) -> dict:
    """``network``: the method's ``network_floor`` (its networks on every view they see), if it has one."""
    if not hasattr(model, "network_floor"):
        return {}

    def network():
        model.zero_grad(set_to_none=True)
        model.network_floor(views)
    return {"network": network}


def dino_reference_fns(model, views: list[torch.Tensor]) -> dict:
    """DINO's ``floor``: the student backbone forward + backward on every crop, one call per run of crops
    of one size (as the step), and the teacher backbone's no-grad forward of the global crops; and its
    ``network``, the same with the DINO heads (``DINO.network_floor``)."""
    from ssl_vision.methods.dino import multicrop

    def floor():
        model.student_backbone.zero_grad(set_to_none=True)
        multicrop(model.student_backbone, views).sum().backward()
        with torch.no_grad():
            multicrop(model.backbone, views[: model.augment.num_global])

    return {"floor": floor, **own_networks(model, views)}


def bench_one(method: str, backbone: str, image_size: int, batch_size: int, warmup: int = 2, repeats: int = 5,
              device: str = "auto", patch_size="auto", overrides=()) -> dict:
    """Floor, full Trainer step, augmentation and peak memory of one method + backbone: one JSON record."""
    warmup = max(1, warmup)  # the first timed interval starts at the end of the last warm-up step
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    cuda = dev.type == "cuda"
    steps = warmup + repeats + 1  # the last one: host syncs counted
    cfg = compose_cfg(method, backbone, image_size, batch_size, steps, patch_size, overrides)
    L.seed_everything(int(cfg.seed), verbose=False)
    dm = SSLDataModule(cfg.data)
    dm.setup()
    apply_device_defaults(cfg, cuda)  # as train.py: channels_last for ResNets and TF32 on GPUs
    model = build_method(cfg, dm.num_classes)  # as train.py: the online probe is part of the real path
    counter = HostSyncCounter(cuda)
    throughput = Throughput()  # FLOPs of the first (warm-up) step; its hooks run before the timer's references
    timer = StepTimer(cuda, method, first_reference=warmup - 1, count_step=steps - 1, counter=counter)
    kwargs = device_trainer_kwargs(OmegaConf.to_container(cfg.trainer, resolve=True), cuda)  # as train.py
    kwargs.update(accelerator="gpu" if cuda else "cpu", devices=1, num_nodes=1, strategy="auto", sync_batchnorm=False,
                  max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                  callbacks=[throughput, timer])
    trainer = L.Trainer(**kwargs)
    baseline, memory_kind = memory_start(dev)
    trainer.fit(model, datamodule=dm)
    peak_mb = memory_peak_mb(dev, baseline, memory_kind)
    times = {name: t[-repeats:] for name, t in timer.times.items()}  # the first calls warmed up

    model.to(dev)  # Lightning's teardown moved it back to the CPU
    images = next(iter(dm.train_dataloader()))[0].to(dev)
    aug_times = time_ms(lambda: model.augment(images), warmup, repeats, cuda)
    floor_ms, step_ms, aug_ms = (statistics.median(t) for t in (times["floor"], times["step"], aug_times))
    record = {
        "method": method, "backbone": backbone, "image_size": image_size, "batch_size": batch_size,
        "device": dev.type, "device_name": device_name(dev), "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
        "floor_ms": floor_ms, "step_ms": step_ms, "step_over_floor": step_ms / floor_ms,
        "images_per_second": batch_size / (step_ms / 1e3),
        "augment_ms": aug_ms, "augment_images_per_second": batch_size * len(model.augment.views) / (aug_ms / 1e3),
        "peak_memory_mb": peak_mb, "memory_kind": memory_kind, "floor_contains": FLOOR[method],
        "flops_per_image": throughput.flops_per_image,
        "floor_samples_ms": times["floor"], "step_samples_ms": times["step"], "overrides": list(overrides),
    }
    record["host_syncs_per_step"], record["host_sync_sites"] = counter.summary()
    record["host_sync_method"] = "cuda sync debug mode" if cuda else "TorchDispatchMode (ops that sync on a GPU)"
    if method == "mae":
        record.update(patch_size=int(model.patch), mask_ratio=float(cfg.method.mask_ratio),
                      masked_ms=statistics.median(times["masked"]), masked_samples_ms=times["masked"])
        record["masked_over_full"] = record["masked_ms"] / floor_ms
    if "network" in times:
        record.update(network_ms=statistics.median(times["network"]), network_samples_ms=times["network"],
                      network_contains=NETWORK[method])
        record["step_over_network"] = step_ms / record["network_ms"]
    if method == "dino":
        record["views"] = [list(v) for v in zip(model.augment.names, model.augment.sizes)]
    return record


def markdown_table(records: list[dict]) -> str:
    """The records as a markdown table, one row per method + backbone."""
    head = ["method", "backbone", "px", "batch", "GFLOPs/img", "floor ms", "step ms", "step/floor", "img/s",
            "aug img/s", "peak MiB", "syncs step/aug/data/PL", "masked ms", "masked/full", "network ms", "step/network"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        masked = [f"{r['masked_ms']:.1f}", f"{r['masked_over_full']:.3f}"] if "masked_ms" in r else [""] * 2
        masked += [f"{r['network_ms']:.1f}", f"{r['step_over_network']:.3f}"] if "network_ms" in r else [""] * 2
        n = r["host_syncs_per_step"]
        syncs = "/".join(str(n[c]) for c in ("step", "augment", "data", "lightning"))
        cells = [r["method"], r["backbone"], str(r["image_size"]), str(r["batch_size"]),
                 f"{r['flops_per_image'] / 1e9:.3g}", f"{r['floor_ms']:.1f}",
                 f"{r['step_ms']:.1f}", f"{r['step_over_floor']:.3f}", f"{r['images_per_second']:.0f}",
                 f"{r['augment_images_per_second']:.0f}", f"{r['peak_memory_mb']:.0f}", syncs, *masked]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_runs(entries: list[str] | None) -> list[tuple[str, str]]:
    """``METHOD`` (its default backbones) or ``METHOD:BACKBONE`` -> [(method, backbone)]."""
    runs = []
    for entry in entries or [m for m, _ in DEFAULT_RUNS]:
        method, _, backbone = entry.partition(":")
        if method not in METHODS:
            raise SystemExit(f"error: --methods: unknown method '{method}'; choose from {', '.join(METHODS)}")
        new = [(method, backbone)] if backbone else [r for r in DEFAULT_RUNS if r[0] == method]
        runs += [r for r in new if r not in runs]
    return runs


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 warm-up + 5 timed steps (else 3 + 10) at the default sizes: 32 px, ResNet batch 64, "
                        "MAE batch 32, patch 4")
    p.add_argument("--methods", nargs="+", metavar="METHOD[:BACKBONE]",
                   help="default: simclr moco_v2 moco_v3 (resnet18) mae (vit_tiny, vit_small)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, help="default: 64 for ResNets, 32 for ViTs")
    p.add_argument("--patch-size", default="auto", help="ViT patch (auto: 4 up to 64 px, 8 up to 96, else 16)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2 with --quick, else 3; at least 1)")
    p.add_argument("--repeats", type=int, help="timed steps (default 5 with --quick, else 10)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides for every run, e.g. trainer.precision=bf16-mixed (before --methods)")
    p.add_argument("--out", default="bench_results.json", help="JSON list of records (default: %(default)s)")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*",
                    ".*overridden `on_after_batch_transfer`.*"):
        warnings.filterwarnings("ignore", message=pattern)

    records = []
    for method, backbone in parse_runs(args.methods):
        batch = args.batch_size or (32 if backbone.startswith("vit") else 64)
        start = time.perf_counter()
        records.append(bench_one(method, backbone, args.image_size, batch, warmup, repeats, args.device, args.patch_size,
                                 args.overrides))
        print(f"{method} {backbone}: {time.perf_counter() - start:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(records, indent=2) + "\n")  # after every run: partial results survive
    r = records[0]
    print(f"\n{r['device_name']} ({r['device']}, {r['threads']} threads), torch {r['torch_version']}, "
          f"median of {repeats} after {warmup} warm-up\n")
    print(markdown_table(records))
    print("\nfloor: " + "; ".join(f"{m}: {FLOOR[m]}" for m in dict.fromkeys(x["method"] for x in records)))
    print("step: a real Trainer iteration (fetch, augmentation, heads, loss, probe, backward, optimizer, EMA/queue); "
          "masked: MAE encoder on visible tokens fwd+bwd; network: the method's own networks, fwd+bwd on every view "
          f"they see (the step adds loss, augmentation, the probe's forward, optimizer); "
          f"peak MiB: {r['memory_kind']}; syncs: host syncs in one iteration by origin (training step / "
          f"augmentation / loader / Lightning), {r['host_sync_method']}")
    print("network: " + "; ".join(f"{m}: {NETWORK[m]}" for m in dict.fromkeys(x["method"] for x in records)
                                  if m in NETWORK))
    for r in records:
        for site in r["host_sync_sites"]:
            print(f"  {r['method']} {r['backbone']}: {site}")
    print(f"wrote {args.out}")
    return records


if __name__ == "__main__":
    main()
