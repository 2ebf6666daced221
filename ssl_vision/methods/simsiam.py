"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning"; facebookresearch/simsiam).

One network on both views, no momentum encoder: a projector ending in BatchNorm without affine and
a bottleneck predictor; ``loss = D(p1, z2) / 2 + D(p2, z1) / 2`` with the stop-gradient on z
(``simsiam_loss``). The predictor's lr stays at its initial value (``--fix-pred-lr``, the paper's
setting): its parameter groups carry ``fixed_lr``, which the base class's schedule honours.
"""

from __future__ import annotations

import torch

from ..losses import simsiam_loss
from .base import SSLMethod, mlp


class SimSiam(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        # simsiam/builder.py: (Linear no bias - BN - ReLU) x 2, Linear (its bias frozen: followed by BN),
        # BN without affine; the paper's CIFAR variant has 2 layers (method.proj_layers)
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim, layers=int(m.proj_layers),
                             last_bn=True, last_bn_affine=False)
        # bottleneck predictor: Linear no bias - BN - ReLU - Linear
        self.predictor = mlp(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, layers=2)

    def param_groups(self) -> list[dict]:
        """The base groups, with the predictor's parameters moved into groups of their own at a fixed lr."""
        pred = {id(p) for p in self.predictor.parameters()}
        groups = []
        for g in super().param_groups():
            if g["name"] in ("decay", "no_decay") and self.cfg.method.get("fix_pred_lr", True):
                mine = [p for p in g["params"] if id(p) in pred]
                groups.append({**g, "params": [p for p in g["params"] if id(p) not in pred]})
                groups.append({**g, "name": f"predictor_{g['name']}", "params": mine, "fixed_lr": True})
            else:
                groups.append(g)
        return [g for g in groups if g["params"]]

    def networks(self, views: list[torch.Tensor]) -> dict:
        """Features, projections and predictions of the two views, each view through the networks on its own."""
        n = self.project_two_views(views)
        n["p"] = [self.predictor(x) for x in n["z"]]
        return n

    def forward_views(self, views):
        n = self.networks(views)
        (z1, z2), (p1, p2) = n["z"], n["p"]
        return {"loss": simsiam_loss(p1, p2, z1, z2), "feats": n["feats"][0], "embedding": z1}

    def network_floor(self, views: list[torch.Tensor]) -> None:
        """tools/bench.py's floor: backbone, projector and predictor forward + backward on each view."""
        sum(p.float().sum() for p in self.networks(views)["p"]).backward()
