"""``python tests/ddp_instrumented.py <ssl-vision-train overrides>``: the real ``ssl-vision-train`` with test
probes, for the multi-process CLI tests (tests/test_ddp.py, tests/test_failures.py).

Lightning's DDP launcher starts the other ranks by running this same script again, so every rank is
instrumented. Environment:

- ``SSLV_TEST_RECORD=<dir>``: each rank writes ``<dir>/rank<r>.json`` at exit with the dataset indexes it
  embedded in each feature extraction (``evaluation.shard``) and the calls of the probes
  (``evaluation.evaluate_features``: rank and number of training features).
- ``SSLV_TEST_NAN=<rank>:<step>``: that rank's loss at that optimizer step is NaN (the others' stay
  finite); the wall time of the injection goes to ``<SSLV_TEST_RECORD>/nan_time``.
"""

import atexit
import json
import os
import time
from pathlib import Path

import torch

import ssl_vision.evaluation as evaluation
from ssl_vision import train
from ssl_vision.distributed import rank

record_dir = Path(os.environ["SSLV_TEST_RECORD"])
record = {"extractions": [], "probes": []}


def counted_shard(loader):
    indexes = []
    record["extractions"].append(indexes)
    for batch in evaluation_shard(loader):
        indexes.extend(batch[-1].tolist())  # the indexes come last in every loader batch
        yield batch


def recorded_probes(train_x, *args, **kwargs):
    record["probes"].append({"rank": rank(), "train_features": list(train_x.shape)})
    return evaluate_features(train_x, *args, **kwargs)


evaluation_shard, evaluate_features = evaluation.shard, evaluation.evaluate_features
evaluation.shard, evaluation.evaluate_features = counted_shard, recorded_probes

if os.environ.get("SSLV_TEST_NAN"):
    from ssl_vision.methods import METHODS

    nan_rank, nan_step = (int(x) for x in os.environ["SSLV_TEST_NAN"].split(":"))

    def with_nan(forward_views):
        def wrapped(self, views):
            out = forward_views(self, views)
            if self.global_rank == nan_rank and self.global_step == nan_step:
                (record_dir / "nan_time").write_text(str(time.time()))
                out["loss"] = out["loss"] * torch.tensor(float("nan"))
            return out
        return wrapped

    for cls in METHODS.values():
        cls.forward_views = with_nan(cls.forward_views)


@atexit.register
def write_record():
    # LOCAL_RANK: set for every rank by Lightning's launcher and by an external launcher (one node)
    (record_dir / f"rank{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    train.main()
