"""Time and memory of the offline probes on synthetic features of a given size (no data set, no backbone).

    python tools/bench_probes.py --n 1281167 --m 50000 --dim 2048 --classes 1000 --device cuda   # ImageNet-1k, R50
    python tools/bench_probes.py --n 20000 --m 2000 --dim 2048 --classes 1000 --device cpu       # a CPU-sized slice

Random class-clustered float32 features (N training, M validation, D dims) are made in host memory, as
extraction leaves them; then one epoch of the default linear probe (``evaluation.linear_probe``: SGD, batch
256, standardized features, ``--chunk-mb`` per streamed block) and the weighted kNN with k = 20 and 200
(``evaluation.knn_accuracy``) run on ``--device``. Prints one JSON line: the host memory of the features,
the seconds of one probe epoch and of the kNN, the achieved FLOP rates (6 N D C per probe epoch, forward and
backward of the head; 2 M N D for the similarities) and, on a GPU, the peak device memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ssl_vision.evaluation import knn_accuracy, linear_probe


def features(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) noisy copies of ``classes`` random centres, and their classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, dim, generator=g) * 0.1
    x = torch.randn(n, dim, generator=g)
    for start in range(0, n, 65536):  # in place, in blocks: one N x D matrix in memory
        x[start:start + 65536] += centers[y[start:start + 65536]]
    return x, y


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="training features")
    p.add_argument("--m", type=int, default=2000, help="validation features (kNN queries)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-mb", type=float, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x, y = features(args.n + args.m, args.dim, args.classes, 0)
    train_x, train_y, val_x, val_y = x[:args.n], y[:args.n], x[args.n:], y[args.n:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    probe, probe_s = timed(lambda: linear_probe(train_x, train_y, val_x, val_y, args.classes, epochs=1,
                                                batch_size=args.batch_size, device=device, chunk_mb=args.chunk_mb))
    knn, knn_s = timed(lambda: knn_accuracy(train_x, train_y, val_x, val_y, args.classes, [20, 200], 0.07, device,
                                            args.chunk_mb))
    n, m, d, c = args.n, args.m, args.dim, args.classes
    result = {
        "device": str(device), "n": n, "m": m, "dim": d, "classes": c, "chunk_mb": args.chunk_mb,
        "host_feature_gb": round(4 * d * (n + m) / 1e9, 3),
        "probe_epoch_s": round(probe_s, 3), "probe_gflops": round(6 * n * d * c / probe_s / 1e9, 1),
        "knn_s": round(knn_s, 3), "knn_gflops": round(2 * m * n * d / knn_s / 1e9, 1),
        "probe_top1": probe["top1"], "knn_top1": knn[20],
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["device_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["device_name"] = torch.cuda.get_device_name(device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
