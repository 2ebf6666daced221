"""VICReg (Bardes, Ponce, LeCun 2022, "Variance-Invariance-Covariance Regularization";
facebookresearch/vicreg main_vicreg.py).

An expander (Linear - BN - ReLU) x 2 - Linear without bias, and ``vicreg_loss``: the invariance
term on this rank's pairs, the variance and covariance terms on the projections gathered from all
ranks with gradient (the reference's FullGatherLayer), so they are statistics of the global batch.
"""

from __future__ import annotations

import torch

from ..distributed import gather_with_grad
from ..losses import vicreg_loss
from .base import SSLMethod, mlp


class VICReg(SSLMethod):
    def __init__(self, cfg, num_classes: int):
        super().__init__(cfg, num_classes)
        m = self.cfg.method  # 8192-8192-8192 in the paper (the reference's hidden biases, before BN, are no-ops)
        self.projector = mlp(self.feat_dim, m.proj_hidden_dim, m.proj_output_dim, layers=int(m.proj_layers),
                             last_bias=False)

    def forward_views(self, views):
        n = self.project_two_views(views)
        z1, z2 = n["z"]
        m = self.cfg.method
        loss, terms = vicreg_loss(z1, z2, gather_with_grad(z1), gather_with_grad(z2), float(m.sim_coeff),
                                  float(m.std_coeff), float(m.cov_coeff))
        for name, value in terms.items() if self._trainer is not None else ():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=len(z1))
        return {"loss": loss, "feats": n["feats"][0], "embedding": z1}

    def network_floor(self, views: list[torch.Tensor]) -> None:
        """tools/bench.py's floor: backbone and expander forward + backward on each view."""
        sum(z.float().sum() for z in self.project_two_views(views)["z"]).backward()
