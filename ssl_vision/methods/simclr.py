"""SimCLR (Chen et al., 2020): two views, an MLP projector, NT-Xent over all other samples."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..distributed import gather_with_grad, rank
from ..losses import nt_xent
from .base import SSLMethod, mlp

PROJECTORS = ("simclr", "solo_learn")
BN_STATS = ("joint", "per_view")


def simclr_projector(kind: str, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """The projection head of the reference a recipe cites (``method.projector``):

    - ``solo_learn``: Linear-ReLU-Linear, both with biases (vturrisi/solo-learn solo/methods/simclr.py),
      the head behind solo-learn's published SimCLR numbers.
    - ``simclr``: google-research/simclr model_util.py ``projection_head`` (``nonlinear``): (Linear
      without bias, BN, ReLU) x (layers - 1), Linear without bias, BN with scale but without centre
      (``center=False``: its bias stays 0 and is not trained); kernels drawn from N(0, 0.01)
      (``linear_layer``). SimCLR v1 used 2 layers, v2 3 (``num_proj_layers``).
    """
    if kind == "solo_learn":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    if kind == "simclr":
        if layers < 2:
            raise ConfigError(f"method.proj_layers: the simclr head needs at least 2 layers, got {layers}")
        head = mlp(in_dim, hidden_dim, out_dim, layers=layers, last_bn=True)
        for m in head:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
        head[-1].bias.requires_grad_(False)  # BN center=False
        return head
    raise ConfigError(f"method.projector: unknown head '{kind}'; choose one of: {', '.join(PROJECTORS)}")


class SimCLR(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method
        self.projector = simclr_projector(m.get("projector", "simclr"), self.feat_dim, int(m.proj_hidden_dim),
                                          int(m.proj_output_dim), int(m.get("proj_layers", 2)))
        self.bn_stats = m.get("bn_stats", "joint")
        if self.bn_stats not in BN_STATS:
            raise ConfigError(f"method.bn_stats: unknown value '{self.bn_stats}'; choose one of: {', '.join(BN_STATS)}")

    def forward_views(self, views):
        b = views[0].shape[0]
        if self.bn_stats == "joint":  # one pass over both views (google-research/simclr concatenates them)
            feats = self.backbone(torch.cat(views[:2]))
            z1, z2 = self.projector(feats).split(b)
        else:  # each view by itself, BatchNorm statistics per view (solo-learn's BaseMethod.training_step)
            f1, f2 = (self.backbone(v) for v in views[:2])
            z1, z2 = self.projector(f1), self.projector(f2)
            feats = f1
        # float32 before the gather (bf16/fp16 under autocast): the gather's backward sums every rank's
        # gradient for these rows, which must not be rounded to 16 bits
        z1, z2 = z1.float(), z2.float()
        # negatives come from every rank, with gradient, so each rank's loss also trains the others
        loss = nt_xent(z1, z2, float(self.cfg.method.temperature),
                       gather_with_grad(z1), gather_with_grad(z2), rank=rank())
        return {"loss": loss, "feats": feats[:b]}
