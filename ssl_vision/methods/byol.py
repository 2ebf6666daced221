"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"; google-deepmind/deepmind-research byol/).

An online network (backbone, projector, predictor) regresses the projection that an EMA target
network (backbone and projector, the base class's ``momentum_copy``: cosine schedule from
``method.momentum`` to 1, updated after every optimizer step) makes of the other view:
``loss = byol_loss(p1, z2') + byol_loss(p2, z1')``. Each view goes through the networks on its own,
so BatchNorm statistics are per view, as the reference's ``apply_once_fn``. The online backbone
(``self.backbone``) is the one evaluated and exported, as in the paper.
"""

from __future__ import annotations

import torch

from ..losses import byol_loss
from .base import SSLMethod, mlp


class BYOL(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method  # byol/utils/networks.py MLP: Linear - BN - ReLU - Linear, for both heads
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim, layers=2)
        self.predictor = mlp(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, layers=2)
        self.momentum_backbone = self.momentum_copy(self.backbone)
        self.momentum_projector = self.momentum_copy(self.projector)

    def networks(self, views: list[torch.Tensor]) -> dict:
        """Online features, projections, predictions and target projections of the two global views."""
        n = self.project_two_views(views)
        n["p"] = [self.predictor(x) for x in n["z"]]
        with torch.no_grad():
            n["target"] = [self.momentum_projector(self.momentum_backbone(v)) for v in views[:2]]
        return n

    def forward_views(self, views):
        n = self.networks(views)
        (p1, p2), (t1, t2) = n["p"], n["target"]
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return {"loss": loss, "feats": n["feats"][0], "embedding": n["z"][0]}

    def network_floor(self, views: list[torch.Tensor]) -> None:
        """tools/bench.py's floor: the online networks forward + backward and the target forward on each view."""
        n = self.networks(views)
        sum(p.float().sum() for p in n["p"]).backward()
