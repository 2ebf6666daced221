"""Online kNN accuracy during pre-training, as solo-learn measures it (solo/methods/base.py feeding
solo/utils/knn.py ``WeightedKNNClassifier``).

In the epochs it is due (every ``eval.online_knn.every_n_epochs``), the bank is the backbone features of
the first view of every training batch of the epoch, the ones the method computed anyway (no extra
forward pass), with their labels; the queries are the validation pass's features. At the end of that
validation each query gets the weighted vote of its k most cosine-similar bank rows (exp(sim / T), as
the offline kNN: ``evaluation.knn_topk`` / ``knn_votes``) and the top-1 accuracy is logged as
``val/knn_top1``. The bank belongs to one epoch: it is emptied when the next training epoch starts.
Differs from solo-learn: its bank holds every large crop and its default distance is euclidean.

Memory. Each rank keeps its own bank on its device, L2-normalized float32, at most
``max_bank / world_size`` rows: the newest labelled ones (unlabelled rows are dropped when the bank is
compacted, once it has grown 25% past that cap; so at most 1.25 x max_bank x D x 4 bytes over all ranks).
The similarity search runs ``chunk_mb`` MiB at a time (``knn_topk``).

DDP. Every rank's bank counts and none is copied: the queries of all ranks are gathered on every rank
(deduplicated by dataset index: Lightning's distributed sampler repeats a few samples to even out the
ranks), each rank finds the k nearest rows of its own bank for every query, and these per-rank top-k
lists are gathered and merged - the k nearest of the union, the same accuracy as one process holding the
whole bank. Every rank runs every collective, with or without bank rows or queries of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_no_grad, world_size
from .evaluation import DEFAULT_CHUNK_MB, knn_topk, knn_votes


def _gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n_r, ...) of every rank, concatenated in rank order, on every rank (n_r may differ)."""
    if world_size() == 1:
        return x
    sizes = gather_no_grad(torch.tensor([len(x)], device=x.device)).tolist()
    pad = torch.zeros((max(sizes) - len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
    out = gather_no_grad(torch.cat([x, pad]))
    step = max(sizes)
    return torch.cat([out[r * step: r * step + s] for r, s in enumerate(sizes)])


class OnlineKNN:
    """The bank, the queries and the accuracy of the online kNN (see the module docstring).

    ``add_bank(feats, labels)`` in each training step (no host synchronisation: the rows stay on the device,
    label -1 = unlabelled), ``add_queries(feats, labels, indexes)`` in each validation step, ``compute()``
    at the end of validation on every rank (collective), ``reset_bank()`` when a training epoch starts.
    """

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07, every_n_epochs: int = 1,
                 max_bank: int | None = 131072, chunk_mb: float = DEFAULT_CHUNK_MB):
        self.num_classes, self.k, self.temperature = int(num_classes), int(k), float(temperature)
        self.every_n_epochs = int(every_n_epochs)
        self.max_bank = None if max_bank is None else int(max_bank)
        self.chunk_mb = float(chunk_mb)
        self.reset_bank()
        self.reset_queries()

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> OnlineKNN | None:
        """From ``eval.online_knn`` of the training config; None when off, absent or without labels."""
        from .config import ConfigError

        ecfg = cfg.get("eval") or {}
        kcfg = ecfg.get("online_knn")
        if num_classes <= 0 or not kcfg or int(kcfg.get("every_n_epochs", 0) or 0) == 0:
            return None
        checks = {"every_n_epochs": int(kcfg.every_n_epochs) >= 0, "k": int(kcfg.k) >= 1,
                  "temperature": float(kcfg.temperature) > 0,
                  "max_bank": kcfg.get("max_bank") is None or int(kcfg.max_bank) >= 1}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"eval.online_knn.{key}: {kcfg.get(key)} is out of range; every_n_epochs >= 0 "
                                  "(0: off), k >= 1, temperature > 0, max_bank >= 1 or null")
        return cls(num_classes, int(kcfg.k), float(kcfg.temperature), int(kcfg.every_n_epochs),
                   kcfg.get("max_bank"), float(ecfg.get("chunk_mb", DEFAULT_CHUNK_MB)))

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) collects a bank and ends with a kNN evaluation."""
        return self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0

    # --- bank and queries ---------------------------------------------------------------------------------
    def reset_bank(self) -> None:
        self.bank_x: list[torch.Tensor] = []
        self.bank_y: list[torch.Tensor] = []
        self.bank_rows = 0

    def reset_queries(self) -> None:
        self.query_x: list[torch.Tensor] = []
        self.query_y: list[torch.Tensor] = []
        self.query_i: list[torch.Tensor] = []

    def _cap(self) -> int | None:
        """This rank's share of ``max_bank``."""
        return None if self.max_bank is None else max(1, self.max_bank // world_size())

    @torch.no_grad()
    def add_bank(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank_x.append(F.normalize(feats.detach().float(), dim=1))
        self.bank_y.append(labels.detach())
        self.bank_rows += len(labels)
        cap = self._cap()
        if cap is not None and self.bank_rows > cap + max(1, cap // 4):
            self._compact(cap)

    def _compact(self, cap: int) -> None:
        """Keep the newest ``cap`` labelled rows (one host read of the labels: every cap / 4 rows at most)."""
        x, y = torch.cat(self.bank_x), torch.cat(self.bank_y)
        keep = torch.nonzero(y >= 0).squeeze(1)[-cap:]
        self.bank_x, self.bank_y = [x[keep]], [y[keep]]
        self.bank_rows = len(keep)

    @torch.no_grad()
    def add_queries(self, feats: torch.Tensor, labels: torch.Tensor, indexes: torch.Tensor) -> None:
        self.query_x.append(F.normalize(feats.detach().float(), dim=1))
        self.query_y.append(labels.detach())
        self.query_i.append(indexes.detach().to(labels.device))

    # --- the evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, device) -> torch.Tensor | None:
        """Weighted kNN top-1 accuracy of the queries of all ranks against the banks of all ranks (the same value
        on every rank), or None when no rank holds a labelled bank row or a query. Collective: every rank calls
        it at the same point. Empties the queries; the bank stays until ``reset_bank``."""
        device = torch.device(device)
        cap = self._cap()
        if self.bank_x:
            x, y = torch.cat(self.bank_x), torch.cat(self.bank_y)
            keep = torch.nonzero(y >= 0).squeeze(1)
            keep = keep if cap is None else keep[-cap:]
            bank_x, bank_y = x[keep].to(device), y[keep].to(device)
        else:
            bank_x, bank_y = torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
        if self.query_x:
            qx, qy, qi = (torch.cat(t).to(device) for t in (self.query_x, self.query_y, self.query_i))
        else:
            qx = torch.zeros(0, 0, device=device)
            qy = qi = torch.zeros(0, dtype=torch.long, device=device)
        self.reset_queries()
        # how many bank rows and queries there are over all ranks, and the feature dimension
        dim = bank_x.shape[1] if len(bank_x) else (qx.shape[1] if len(qx) else 0)
        meta = gather_no_grad(torch.tensor([[len(bank_x), len(qx), dim]], device=device)).cpu()
        if int(meta[:, 0].sum()) == 0 or int(meta[:, 1].sum()) == 0:
            return None
        dim = int(meta[:, 2].max())
        qx = qx if len(qx) else torch.zeros(0, dim, device=device)
        bank_x = bank_x if len(bank_x) else torch.zeros(0, dim, device=device)
        qx, qy, qi = _gather_uneven(qx), _gather_uneven(qy), _gather_uneven(qi)
        order = torch.argsort(qi, stable=True)  # each validation sample once, in dataset order
        first = torch.ones(len(order), dtype=torch.bool, device=device)
        first[1:] = qi[order][1:] != qi[order][:-1]
        unique = order[first]
        qx, qy = qx[unique], qy[unique]
        top_s = torch.full((len(qx), self.k), float("-inf"), device=device)
        top_l = torch.zeros((len(qx), self.k), dtype=torch.long, device=device)
        s, l = knn_topk(bank_x, bank_y, qx, self.k, device, self.chunk_mb, normalized=True)
        top_s[:, : s.shape[1]], top_l[:, : l.shape[1]] = s, l  # fewer bank rows than k here: -inf, no vote
        if world_size() > 1:  # the k nearest of the union of every rank's k nearest
            all_s = gather_no_grad(top_s[None]).permute(1, 0, 2).reshape(len(qx), -1)
            all_l = gather_no_grad(top_l[None]).permute(1, 0, 2).reshape(len(qx), -1)
            top_s, pick = all_s.topk(self.k, dim=1)
            top_l = all_l.gather(1, pick)
        votes = knn_votes(top_s, top_l, self.num_classes, self.k, self.temperature)
        return (votes.argmax(1) == qy).float().mean()
