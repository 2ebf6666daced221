"""tools/bench.py on a tiny setting: every record has the required, positive numbers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
REQUIRED = ("floor_ms", "step_ms", "step_over_floor", "images_per_second", "augment_images_per_second",
            "flops_per_image", "peak_memory_mb")


def bench_module():
    if "ssl_vision_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ssl_vision_bench", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["ssl_vision_bench"] = module
    return sys.modules["ssl_vision_bench"]


@pytest.fixture(scope="module")
def bench():
    return bench_module()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy machine these tiny models mostly wait for their second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_record(r, batch):
    assert (r["batch_size"], r["device"], r["repeats"]) == (batch, "cpu", 2)
    assert r["torch_version"] and r["device_name"] and r["threads"] >= 1 and r["memory_kind"]
    assert all(r[k] > 0 for k in REQUIRED[:-1]) and r["peak_memory_mb"] >= 0
    assert len(r["step_samples_ms"]) == len(r["floor_samples_ms"]) == 2
    assert r["step_over_floor"] == pytest.approx(r["step_ms"] / r["floor_ms"])
    assert r["images_per_second"] == pytest.approx(batch / (r["step_ms"] / 1e3))
    # no host sync in the hot path of the step (training step, probe, loss, EMA / queue); the others are
    # counted and reported: the augmentation's (Kornia), the loader's host tensors, Lightning's, torch.optim's
    syncs = r["host_syncs_per_step"]
    assert set(syncs) == set(bench_module().CATEGORIES) and syncs["step"] == 0, r["host_sync_sites"]
    assert syncs["lightning"] == 0  # none on a step without logging: no per-step progress-bar value


def test_cli_benchmarks_the_resnet_methods_and_writes_the_records(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    records = bench.main(["--methods", "simclr:resnet18_tiny", "moco_v2:resnet18_tiny", "moco_v3:resnet18_tiny",
                          "--image-size", "16", "--batch-size", "8", "--warmup", "1", "--repeats", "2",
                          "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == records
    assert [r["method"] for r in records] == ["simclr", "moco_v2", "moco_v3"]
    for r in records:
        assert (r["backbone"], r["image_size"]) == ("resnet18_tiny", 16)
        check_record(r, 8)
    table = capsys.readouterr().out
    assert "| simclr | resnet18_tiny | 16 | 8 |" in table and "step/floor" in table


def test_mae_record_compares_masked_with_full_tokens(bench):
    r = bench.bench_one("mae", "vit_tiny", 16, 8, warmup=1, repeats=2, device="cpu", patch_size=4,
                        overrides=["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"])
    check_record(r, 8)
    assert (r["patch_size"], r["mask_ratio"]) == (4, 0.75) and len(r["masked_samples_ms"]) == 2
    assert r["masked_over_full"] == pytest.approx(r["masked_ms"] / r["floor_ms"])
    assert len(r["network_samples_ms"]) == 2 and r["network_ms"] > 0
    assert r["step_over_network"] == pytest.approx(r["step_ms"] / r["network_ms"])


def test_methods_expand_to_their_default_backbones(bench):
    assert bench.parse_runs(["mae", "simclr:resnet50"]) == [("mae", "vit_tiny"), ("mae", "vit_small"),
                                                            ("simclr", "resnet50")]
    assert len(bench.parse_runs(None)) == 10 and {m for m, _ in bench.parse_runs(None)} == set(bench.METHODS)
    assert bench.parse_runs(["dino"]) == [("dino", "resnet18")]
    with pytest.raises(SystemExit, match="unknown method 'swav'"):
        bench.parse_runs(["swav"])


def test_byol_record_compares_the_step_with_its_own_networks(bench):
    r = bench.bench_one("byol", "resnet18_tiny", 16, 8, warmup=1, repeats=2, device="cpu",
                        overrides=["method.proj_hidden_dim=32", "method.pred_hidden_dim=32",
                                   "method.proj_output_dim=16"])
    check_record(r, 8)
    assert len(r["network_samples_ms"]) == 2 and r["network_ms"] > 0 and "predictor" in r["network_contains"]
    assert r["step_over_network"] == pytest.approx(r["step_ms"] / r["network_ms"])


def test_dino_references_train_the_student_on_every_crop_and_run_the_teacher_on_the_globals(bench):
    from ssl_vision.methods import build_method

    cfg = bench.compose_cfg("dino", "resnet18_tiny", 32, 4, steps=1,
                            extra=["method.out_dim=16", "method.hidden_dim=16", "method.bottleneck_dim=8"])
    model = build_method(cfg, int(cfg.data.num_classes))
    assert model.augment.sizes == [32, 32] + [14] * 8  # the paper's 224 / 96 px ratio
    views = model.augment(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    seen = []  # (network, batch, size) of every backbone call
    for name, net in (("student", model.student_backbone), ("teacher", model.backbone)):
        net.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, *args[0].shape[::2])))
    fns = bench.reference_fns(model, "dino", views)
    grads = lambda mod: [p.grad is not None for p in mod.parameters()]  # noqa: E731
    fns["floor"]()
    assert seen == [("student", 8, 32), ("student", 32, 14), ("teacher", 8, 32)]
    assert all(grads(model.student_backbone)) and not any(grads(model.head)) and not any(grads(model.backbone))
    seen.clear()
    fns["network"]()
    assert seen == [("student", 8, 32), ("student", 32, 14), ("teacher", 8, 32)]
    assert all(grads(model.student_backbone)) and any(grads(model.head.mlp)) and not any(grads(model.teacher_head))


def test_moco_v2_queue_and_data_fit_the_batch(bench):
    cfg = bench.compose_cfg("moco_v2", "resnet18_tiny", 16, 8, steps=3)
    assert cfg.method.queue_size == 16 * 8
    assert cfg.data.num_samples * (1 - cfg.data.val_fraction) >= cfg.method.queue_size
    assert (cfg.data.image_size, cfg.data.canvas_size, cfg.data.batch_size) == (16, 16, 8)


def test_a_host_sync_in_the_step_is_counted_and_located(bench, monkeypatch):
    """The counter's negative control: a step that reads its loss on the host (``float(loss)``, as a
    non-finite check by ``if not torch.isfinite(loss)`` would) and indexes with a boolean mask."""
    from ssl_vision.methods.base import SSLMethod

    online_probe = SSLMethod.online_probe

    def syncing_probe(self, feats, labels):
        known = labels >= 0
        feats[known].sum()  # boolean-mask indexing: nonzero inside
        out = online_probe(self, feats, labels)
        float(out[0].detach())  # .item()
        return out

    monkeypatch.setattr(SSLMethod, "online_probe", syncing_probe)
    r = bench.bench_one("simclr", "resnet18_tiny", 16, 8, warmup=1, repeats=1, device="cpu")
    assert r["host_syncs_per_step"]["step"] == 2
    # each is located at the line of ssl_vision that called the code which synced
    sites = [s for s in r["host_sync_sites"] if s.startswith("step: ssl_vision.methods.base:")]
    assert len(sites) == 2 and all("(training_step)" in s for s in sites), r["host_sync_sites"]
    assert {s.split()[-1] for s in sites} == {"aten.index", "aten._local_scalar_dense"}


def test_gpu_counting_takes_the_sync_debug_warnings_and_passes_the_others_on(bench, monkeypatch):
    """The GPU path without a GPU: torch.cuda.set_sync_debug_mode("warn") makes every synchronizing call warn
    "called a synchronizing CUDA operation" (c10/cuda); the counter turns those into events, every other
    warning still reaches the user, and stop() restores the warning machinery and the debug mode."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    counter = bench.HostSyncCounter(cuda=True)
    counter.start()
    for _ in range(2):  # the same call site twice: both counted
        warnings.warn("called a synchronizing CUDA operation")
    warnings.warn("something else")
    counter.stop()
    warnings.warn("after the window")
    assert modes == ["warn", 0]
    assert [what for _, what, _ in counter.events] == ["cuda sync", "cuda sync"]
    assert counter.summary()[0]["other"] == 2  # this test's frames are neither ssl_vision's nor Lightning's
    assert shown == ["something else", "after the window"]
