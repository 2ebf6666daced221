"""Loss functions: pure functions of tensors.

Cross-rank gathering happens in the caller (``ssl_vision.distributed``); a loss receives the local
tensors, the gathered ones, and this rank's offset into the gathered batch. Every loss runs in
float32 with autocast off (``float32``), also when the trainer's precision is bf16/16-mixed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def float32(loss_fn):
    """Run ``loss_fn`` in float32 with autocast off; 16-bit tensor arguments are upcast.

    Under mixed precision the heads run in bf16/fp16, but the losses must not: bf16 keeps 8
    significant bits, so cosine similarities from 0.991 to 0.994 all become the same logit before
    the division by the temperature, and squared pixel errors lose their small differences.
    """
    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return loss_fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper


@float32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            z1_all: torch.Tensor | None = None, z2_all: torch.Tensor | None = None,
            rank: int = 0) -> torch.Tensor:
    """SimCLR's NT-Xent (InfoNCE over 2N-1 candidates).

    z1, z2: (B, D) projections of the two views of this rank's batch.
    z1_all, z2_all: (W*B, D) the same gathered from all ranks (with gradient), or None (one process).
    Each local sample's positive is its other view; all other 2WB-2 samples are negatives; the
    similarity of a sample to itself is masked at this rank's offset ``rank * B``.
    """
    b = z1.shape[0]
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    n_all = z1_all.shape[0]
    q = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D)
    k = F.normalize(torch.cat([z1_all, z2_all]), dim=1)  # (2WB, D)
    logits = q @ k.T / temperature  # (2B, 2WB)
    local = torch.arange(b, device=q.device) + rank * b
    self_idx = torch.cat([local, local + n_all])
    pos_idx = torch.cat([local + n_all, local])
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * b, device=q.device), self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


@float32
def moco_v2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE against a queue of negatives (He et al. 2020, Alg. 1).

    q: (B, D) queries; k: (B, D) their positive keys (momentum encoder, no gradient);
    queue: (K, D) negative keys from earlier batches (all ranks). Inputs are L2-normalized here.
    Each query's logits are ``[q.k, q.queue_1, ..., q.queue_K] / T`` and its label is 0.
    """
    q, k, queue = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1), F.normalize(queue.detach(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ queue.T  # (B, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@float32
def moco_v3_ctr(q: torch.Tensor, k_all: torch.Tensor, temperature: float, rank: int = 0) -> torch.Tensor:
    """MoCo v3's contrastive term ``ctr(q, k)`` scaled by 2T (Chen et al. 2021, Alg. 1).

    q: (B, D) this rank's queries (predictor outputs); k_all: (W*B, D) keys gathered from all ranks
    without gradient. The positive of local query i is key ``rank * B + i``; all other keys are
    negatives. The 2T factor makes the gradient scale independent of the temperature.
    """
    q, k_all = F.normalize(q, dim=1), F.normalize(k_all.detach(), dim=1)
    logits = q @ k_all.T / temperature  # (B, W*B)
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_loss(q1: torch.Tensor, q2: torch.Tensor, k1_all: torch.Tensor, k2_all: torch.Tensor,
                 temperature: float, rank: int = 0) -> torch.Tensor:
    """The symmetric MoCo v3 loss ``ctr(q1, k2) + ctr(q2, k1)`` (see ``moco_v3_ctr``)."""
    return moco_v3_ctr(q1, k2_all, temperature, rank) + moco_v3_ctr(q2, k1_all, temperature, rank)


@float32
def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False,
             eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction loss: per-patch MSE averaged over the masked patches only.

    pred, target: (B, L, P) predicted and true patch pixels; mask: (B, L), 1 = masked (predicted),
    0 = visible. With ``norm_pix`` each target patch is normalized by its own mean and std.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


@float32
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, eq. 2): the batch mean of ``||p/|p| - z/|z| ||^2``.

    p: (B, D) online predictions of one view; z: (B, D) target projections of the other view (no
    gradient). Equals ``2 - 2 cos(p, z)``; deepmind-research byol/utils/helpers.py ``regression_loss``.
    BYOL's symmetric loss is ``byol_loss(p1, z2) + byol_loss(p2, z1)`` (a sum, in [0, 8]).
    """
    return (F.normalize(p, dim=-1) - F.normalize(z.detach(), dim=-1)).pow(2).sum(dim=-1).mean()


@float32
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetrized negative cosine (Chen & He 2021, Alg. 1): ``D(p1, z2) / 2 + D(p2, z1) / 2``.

    p1, p2: (B, D) predictor outputs; z1, z2: (B, D) projections, stop-gradient applied here.
    ``D(p, z) = -mean_b cos(p_b, z_b)``, as facebookresearch/simsiam main_simsiam.py (CosineSimilarity).
    """
    return -(F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
             + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()) * 0.5


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def gram_frobenius(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a^T b||_F^2`` of (N, D) ``a``, ``b`` as ``<a a^T, b b^T>`` through the N x N Gram matrices: the same
    sum, O(N^2 D) instead of the D x D matrix's O(N D^2). At the papers' D = 8192 and N = 64 (one CPU thread)
    the losses' forward + backward take 48 ms (Barlow Twins) / 83 ms (VICReg) instead of 3.4 s / 5.5 s."""
    return ((a @ a.T) * (b @ b.T)).sum()


@float32
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, scale: float = 1.0,
                      eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, Alg. 1): ``sum_i (1 - C_ii)^2 + lambda sum_{i!=j} C_ij^2``, times ``scale``.

    z1, z2: (N, D) projections of the two views of the WHOLE batch, gathered from all ranks with
    gradient: each dimension is standardized over the N samples (BatchNorm without affine, biased
    variance, ``eps`` 1e-5, as the reference's SyncBatchNorm), and ``C = z1n^T z2n / N``. Per-rank
    statistics would be a different loss (facebookresearch/barlowtwins main.py: SyncBatchNorm, then
    ``c / batch_size`` all-reduced over ranks). ``scale``: solo-learn's ``scale_loss`` (the reference: 1).
    With N < D the off-diagonal sum is ``||C||_F^2 - sum_i C_ii^2`` through ``gram_frobenius``: the same
    value without the D x D matrix.
    """
    n, d = z1.shape
    z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    if n >= d:  # the reference's D x D matrix
        c = z1n.T @ z2n / n
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        return scale * (on_diag + lambd * off_diagonal(c).pow(2).sum())
    diag = (z1n * z2n).sum(0) / n  # C_ii
    off = gram_frobenius(z1n, z2n) / n**2 - diag.pow(2).sum()  # sum_{i!=j} C_ij^2
    return scale * ((diag - 1).pow(2).sum() + lambd * off)


@float32
def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor | None = None,
                z2_all: torch.Tensor | None = None, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """VICReg (Bardes et al. 2022): ``sim * s(Z, Z') + std * [v(Z) + v(Z')] / 2 + cov * [c(Z) + c(Z')]``.

    z1, z2: (B, D) this rank's projections; z1_all, z2_all: (N, D) the same gathered from all ranks with
    gradient (None: one process). The invariance term is this rank's MSE (DDP's gradient average makes
    it the global mean); variance ``v = mean_j relu(1 - sqrt(Var(z_j) + eps))`` and covariance
    ``c = sum_{i!=j} Cov(Z)_ij^2 / D`` use the global batch (unbiased, N - 1), as
    facebookresearch/vicreg main_vicreg.py (FullGatherLayer; its std term is halved per branch).
    Returns ``(loss, {"invariance", "variance", "covariance"})`` (the unweighted terms, detached).
    With N < D the off-diagonal sum is ``||Cov||_F^2 - sum_i Cov_ii^2`` through ``gram_frobenius``: the same
    value without the D x D matrices.
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    n, d = z1_all.shape
    inv = F.mse_loss(z1, z2)
    x, y = z1_all - z1_all.mean(0), z2_all - z2_all.mean(0)
    var = (F.relu(1 - torch.sqrt(x.var(0) + eps)).mean() + F.relu(1 - torch.sqrt(y.var(0) + eps)).mean()) / 2
    if n >= d:  # the reference's D x D covariance matrices
        cov = off_diagonal(x.T @ x / (n - 1)).pow(2).sum() / d + off_diagonal(y.T @ y / (n - 1)).pow(2).sum() / d
    else:
        cov = sum(gram_frobenius(t, t) - t.pow(2).sum(0).pow(2).sum() for t in (x, y)) / ((n - 1) ** 2 * d)
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return loss, {"invariance": inv.detach(), "variance": var.detach(), "covariance": cov.detach()}


class _DINOCrossEntropy(torch.autograd.Function):
    """``mean over pairs (g, v != g) of mean_b -sum_k t_gbk log_softmax(s_vb / T)_k`` with its gradient
    written out, for (V, B, K) logits with K = 65536 prototypes: autograd through ``log_softmax`` and an
    einsum keeps four (V, B, K) tensors and makes about twice as many passes over them. With
    ``sum_k t_gbk = 1`` the cross-entropy is ``lse(s_vb / T) - sum_k t_gbk s_vbk / T``, and its gradient
    with respect to ``s_vbk`` is ``(n_v softmax(s_vb / T)_k - sum_{g != v} t_gbk) / (T B P)`` (n_v: the
    teacher views paired with v, P the pairs). The forward keeps ``exp(s / T - max)`` in one (V, B, K)
    buffer, which the backward turns into the gradient in place: that buffer is the only (V, B, K)
    allocation, so the graph can be back-propagated once (as every training step does)."""

    @staticmethod
    def forward(ctx, student, targets, temp):
        v, b, _ = student.shape
        g = targets.shape[0]
        probs = torch.empty_like(student)
        sumexp = student.new_empty(v, b, 1)
        lse = student.new_empty(v, b)
        for i in range(v):  # one view at a time: (B, K) temporaries only
            x = torch.div(student[i], temp, out=probs[i])
            top = x.amax(-1, keepdim=True)
            x.sub_(top).exp_()
            torch.sum(x, -1, keepdim=True, out=sumexp[i])
            lse[i] = sumexp[i, :, 0].log() + top[:, 0]
        dot = targets.reshape(g, -1) @ student.reshape(v, -1).T / temp  # (G, V): sum_bk t_gbk s_vbk / T
        ce = (lse.sum(1) - dot) / b  # (G, V) batch-mean cross-entropy
        same = torch.eye(g, v, dtype=torch.bool, device=ce.device)  # teacher view g vs student view g
        ctx.save_for_backward(probs, sumexp, targets)
        ctx.temp, ctx.used = temp, False
        return ce.masked_fill(same, 0).sum() / (g * v - g)

    @staticmethod
    def backward(ctx, grad):
        if ctx.used:
            raise RuntimeError("dino_loss: its backward reuses the forward's buffer and runs once per graph")
        ctx.used = True
        probs, sumexp, targets = ctx.saved_tensors
        v, b, _ = probs.shape
        g = targets.shape[0]
        scale = grad / ((g * v - g) * b * ctx.temp)
        total = targets.sum(0)  # the teacher views paired with a local view
        for i in range(v):  # in place, same-shape or per-row operands only
            x = probs[i].mul_((g - 1 if i < g else g) / sumexp[i])  # n_v softmax
            x.sub_(total)
            if i < g:  # a global view is not paired with its own teacher view
                x.add_(targets[i])
            x.mul_(scale)
        return probs, None, None


@float32
def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """DINO's cross-entropy between teacher and student over pairs of different views (Caron et al. 2021, Alg. 1).

    student: (V, B, K) student logits of all V views (globals first); teacher: (G, B, K) teacher
    logits of the G global views (no gradient); center: (1, K). The teacher's targets are
    ``softmax((t - center) / teacher_temp)``, the student's ``log_softmax(s / student_temp)``; the loss
    is the mean over the ``G * V - G`` pairs (teacher view g, student view v != g) of the batch mean of
    ``-sum_k t_k log s_k``, as facebookresearch/dino main_dino.py ``DINOLoss.forward``. The value and
    gradient are computed by ``_DINOCrossEntropy`` (the same formula, fewer passes over the logits).
    """
    targets = F.softmax((teacher.detach() - center) / teacher_temp, dim=-1)
    return _DINOCrossEntropy.apply(student, targets, student_temp)
