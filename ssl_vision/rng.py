"""Counter-based random numbers keyed by (seed, epoch, sample index, stream).

Every random draw of the data path - each view's crop, flip, colour jitter, grayscale, blur and
solarize, the MAE mask, the offline probe's fixed crops - is a hash of the run's seed, the epoch,
the sample's index in its dataset and a named stream (``"view0"``, ``"mae_mask"``, ...), not a
draw from a shared generator. So:

- no two ranks repeat each other's draws (they hold different samples), while the model's
  initialisation, drawn from the usual seeded generator, stays the same on every rank;
- an image's augmentation does not depend on the number of ranks, the batch it lands in or its
  position there: a 2-rank run sees exactly the views of a 1-rank run;
- a resumed run draws exactly what the uninterrupted run would have, with no state to save.

The hash is Chris Wellons' ``lowbias32`` integer mixer, computed in int64 tensors on 32-bit values
(the low 32 bits of a wrapped product are exact), so it runs on any device without a host sync.
A uniform is the hash's top 24 bits / 2^24.
"""

from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective 32-bit integer hash (values in [0, 2^32) held in int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _mix_int(x: int) -> int:
    """``_mix`` of one Python int (the per-batch part of a key: no tensor, so nothing to sync)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def stream_id(name: str) -> int:
    """A stable 32-bit id for a stream name."""
    return zlib.crc32(name.encode())


def keyed_uniform(seed: int, epoch: int, index: torch.Tensor, stream: str | int, n: int) -> torch.Tensor:
    """Uniform [0, 1) float32 of shape ``(len(index), n)`` on ``index``'s device.

    Row ``i`` depends only on ``(seed, epoch, index[i], stream)``; column ``j`` is the ``j``-th number of
    that sample's stream.
    """
    sid = stream_id(stream) if isinstance(stream, str) else int(stream)
    base = _mix_int(_mix_int(int(seed) * _GOLDEN + sid) ^ (int(epoch) * 0x85EBCA6B))
    key = _mix((index.to(torch.int64) & _M32) ^ base)  # (B,)
    counter = torch.arange(n, device=index.device, dtype=torch.int64) * _GOLDEN
    bits = _mix((key[:, None] + counter[None, :] + 1) & _M32)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
