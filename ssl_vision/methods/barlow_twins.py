"""Barlow Twins (Zbontar et al. 2021, "Self-Supervised Learning via Redundancy Reduction";
facebookresearch/barlowtwins main.py).

A projector (Linear - BN - ReLU) x 2 - Linear, no bias, and the cross-correlation loss
``barlow_twins_loss``: the projections of the two views are gathered from all ranks with gradient,
so the per-dimension standardization and the cross-correlation matrix are those of the global
batch (the reference: SyncBatchNorm, then ``c / batch_size`` summed over ranks).
"""

from __future__ import annotations

import torch

from ..distributed import gather_with_grad
from ..losses import barlow_twins_loss
from ..optim import scaled_lr
from .base import SSLMethod, mlp


class BarlowTwins(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method  # 8192-8192-8192 in the paper; BatchNorm after each hidden layer
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim, layers=int(m.proj_layers),
                             last_bias=False)

    def param_groups(self) -> list[dict]:
        """The reference's second lr: biases and BN parameters (the no-decay group) at ``method.bias_lr``."""
        groups, bias_lr = super().param_groups(), self.cfg.method.get("bias_lr")
        for g in groups:
            if g["name"] == "no_decay" and bias_lr is not None:
                g["lr"] = scaled_lr(float(bias_lr), self.global_batch_size(), bool(self.cfg.optimizer.get("scale_lr", True)))
        return groups

    def forward_views(self, views):
        n = self.project_two_views(views)
        z1, z2 = n["z"]
        m = self.cfg.method
        # the whole batch's statistics: every rank computes the same loss on the gathered projections,
        # and the gather's backward sends each rank the gradient of its own samples
        loss = barlow_twins_loss(gather_with_grad(z1), gather_with_grad(z2), float(m.lambd), float(m.scale_loss))
        return {"loss": loss, "feats": n["feats"][0], "embedding": z1}

    def network_floor(self, views: list[torch.Tensor]) -> None:
        """tools/bench.py's floor: backbone and projector forward + backward on each view."""
        sum(z.float().sum() for z in self.project_two_views(views)["z"]).backward()
