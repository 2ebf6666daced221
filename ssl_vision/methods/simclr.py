"""SimCLR (Chen et al., 2020): two views, an MLP projector, NT-Xent over all other samples."""

from __future__ import annotations

import torch

from ..distributed import gather_with_grad, rank
from ..losses import nt_xent
from .base import SSLMethod, mlp


class SimCLR(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim, layers=2)

    def forward_views(self, views):
        b = views[0].shape[0]
        feats = self.backbone(torch.cat(views[:2]))  # one pass: BN statistics over both views
        # float32 before the gather (bf16/fp16 under autocast): the gather's backward sums every rank's
        # gradient for these rows, which must not be rounded to 16 bits
        z1, z2 = self.projector(feats).float().split(b)
        # negatives come from every rank, with gradient, so each rank's loss also trains the others
        loss = nt_xent(z1, z2, float(self.cfg.method.temperature),
                       gather_with_grad(z1), gather_with_grad(z2), rank=rank())
        return {"loss": loss, "feats": feats[:b]}
