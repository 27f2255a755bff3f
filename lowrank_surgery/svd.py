"""Batched truncated SVD and common-subspace (CoRA) extraction: pure tensors in, CPU tensors out.

Algorithms:
- `exact`: reduced `torch.linalg.svd`, same-shape matrices stacked into one batch.
- `gram`: eigh of the smaller Gram matrix (A Aᵀ or AᵀA) formed in float64, then one Rayleigh-Ritz step
  (a small SVD of the r×n or m×r projection) for the singular values and the other factor. Squaring the
  condition number costs nothing here: in float64 the subspace error is about 1e-16·σ₁²/(σ_r² − σ_{r+1}²),
  below the 1e-7·σ₁/(σ_r − σ_{r+1}) of a float32 SVD unless σ₁/σ_r > 1e9. U_r S_r Vh_r = U_r U_rᵀ A exactly,
  so PiSSA's rank-r truncation is reproduced to float32 precision.
- `randomized`: Halko, Martinsson & Tropp range finder with oversampling and power iterations, each
  re-orthonormalised by QR, followed by the same Rayleigh-Ritz step.
Signs are fixed so that the largest-magnitude entry of every column of U is positive.

`lowrank_factors` turns a truncated SVD into LoRA factors (B, A), for PiSSA's init, extract-lora and convert's
truncation alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import scipy.linalg
import torch
from torch import Tensor

from .device import resolve_device
from .errors import LrsError

ALGORITHMS = ("exact", "gram", "randomized")
SEED = 0


def reduced_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(a, full_matrices=False); on CUDA through cuSOLVER's QR-based gesvd.

    torch's CUDA default (Jacobi, gesvdj) trades accuracy for speed: on an H200 its rank-16 PiSSA factors of
    the generated 1B checkpoint's attention weights were 8.5e-2 (relative, max) away from the CPU's, where a
    float32 CPU SVD is 2e-5 from float64 on such weights (benchmarks/gpu_check.py).
    """
    if a.is_cuda:
        return torch.linalg.svd(a, full_matrices=False, driver="gesvd")
    return torch.linalg.svd(a, full_matrices=False)


def truncated_svd(mats: Sequence[Tensor], rank: int, algorithm: str = "exact", niter: int = 4, oversample: int = 8,
                  device: str | torch.device = "auto", dtype: torch.dtype = torch.float32, memory_budget: int = 2**30,
                  generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(U_r m×r, S_r r, Vh_r r×n) per matrix, on CPU in `dtype`; same shapes run as batches within `memory_budget` bytes."""
    _check_algorithm(algorithm)
    dev = resolve_device(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(SEED)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, a in enumerate(mats):
        if a.ndim != 2:
            raise LrsError(f"truncated SVD needs 2-D matrices, got shape {tuple(a.shape)}")
        groups.setdefault((a.shape[0], a.shape[1]), []).append(k)
    out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(mats)
    for (m, n), idx in groups.items():
        _check_rank(rank, m, n, "matrix")
        per = _bytes_per_matrix(m, n, rank + oversample, algorithm, dtype)
        for chunk in _chunks(idx, max(1, memory_budget // per)):
            batch = torch.stack([mats[k].to(dev, dtype) for k in chunk])
            u, s, vh = _batched_svd(batch, rank, algorithm, niter, oversample, gen)
            u, vh = _fix_signs(u, vh)
            for j, k in enumerate(chunk):
                out[k] = (u[j].to("cpu", dtype), s[j].to("cpu", dtype), vh[j].to("cpu", dtype))
    return out  # type: ignore[return-value]


def lowrank_factors(mats: Sequence[Tensor], rank: int, distribute_scale: bool = False, scale: float = 1.0,
                    algorithm: str = "exact", niter: int = 4, device: str | torch.device = "auto",
                    generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    """LoRA factors (B, A) per matrix with scale·B·A its rank-r truncation, split as `split_factors` does; same
    shapes share one batched `truncated_svd`."""
    svds = truncated_svd(mats, rank, algorithm=algorithm, niter=niter, device=device, generator=generator)
    return [split_factors(u, s, vh, distribute_scale, scale) for u, s, vh in svds]


def split_factors(u: Tensor, s: Tensor, vh: Tensor, distribute_scale: bool = False, scale: float = 1.0
                  ) -> tuple[Tensor, Tensor]:
    """LoRA factors (B, A) with scale·B·A = U·diag(S)·Vh: B = U·diag(S/scale), A = Vh (all of S on B, A's rows
    orthonormal: mergekit's split), or with `distribute_scale` B = U·diag(√(S/scale)), A = diag(√(S/scale))·Vh
    (PiSSA's split: column i of B and row i of A have the same norm)."""
    values = s.clamp_min(0) / scale
    if not distribute_scale:
        return (u * values).contiguous(), vh.contiguous()
    root = values.sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous()


def common_basis(blocks: Sequence[Tensor], rank: int, algorithm: str = "gram", niter: int = 4, oversample: int = 8,
                 device: str | torch.device = "auto", generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, float]:
    """Top-r left singular vectors of M = [W_1 | W_2 | …] (float32 out×r), their singular values and captured energy."""
    _check_algorithm(algorithm)
    if not blocks:
        raise LrsError("common basis needs at least one matrix")
    out = blocks[0].shape[0]
    for w in blocks:
        if w.ndim != 2 or w.shape[0] != out:
            raise LrsError(f"blocks of a common basis must share their rows: got {tuple(w.shape)} after {out} rows")
    _check_rank(rank, out, sum(w.shape[1] for w in blocks), "concatenation")
    if algorithm == "gram":
        acc = GramAccumulator(device)
        for w in blocks:
            acc.add(w)
        return acc.result(rank)
    dev = resolve_device(device)
    if algorithm == "exact":
        u, s, _ = reduced_svd(torch.cat([w.to(dev, torch.float32) for w in blocks], dim=1))
        u, s = u[:, :rank], s[:rank]
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(SEED)
        u, s = _randomized_common(blocks, rank, niter, oversample, dev, gen)
    total = sum(float(w.to(dev, torch.float64).square().sum()) for w in blocks)
    u, _ = _fix_signs(u[None], None)
    return u[0].float().cpu(), s.float().cpu(), _energy(s, total)


class GramAccumulator:
    """Streams matrices W (out × in_k) into G = Σ W Wᵀ in float64 on the device; `result` gives the common basis."""

    def __init__(self, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        self.gram: Tensor | None = None
        self.columns = 0

    def add(self, w: Tensor) -> None:
        """Accumulate W Wᵀ."""
        if w.ndim != 2 or (self.gram is not None and w.shape[0] != self.gram.shape[0]):
            rows = "" if self.gram is None else f" with {self.gram.shape[0]} rows"
            raise LrsError(f"cannot accumulate a matrix of shape {tuple(w.shape)} into a Gram matrix{rows}")
        w64 = w.to(self.device, torch.float64)
        self.gram = w64 @ w64.T if self.gram is None else self.gram.addmm_(w64, w64.T)
        self.columns += w.shape[1]

    def result(self, rank: int) -> tuple[Tensor, Tensor, float]:
        """(U_r float32 out×r, S_r float32 r, captured energy Σ_{i≤r}σ_i² / Σσ_i²)."""
        if self.gram is None:
            raise LrsError("common basis needs at least one matrix")
        _check_rank(rank, self.gram.shape[0], self.columns, "concatenation")
        vals, vecs = _top_eigh(self.gram[None], rank)
        u, _ = _fix_signs(vecs, None)
        s = vals[0].clamp_min(0).sqrt()
        return u[0].float().cpu(), s.float().cpu(), _energy(s, float(self.gram.trace()))


def _batched_svd(a: Tensor, rank: int, algorithm: str, niter: int, oversample: int, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r SVD of a (b, m, n) batch."""
    if algorithm == "exact":
        u, s, vh = reduced_svd(a)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if algorithm == "gram":
        return _gram_svd(a, rank)
    return _randomized_svd(a, rank, niter, oversample, gen)


def _gram_svd(a: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r eigenvectors of the smaller float64 Gram, then Rayleigh-Ritz for S and the other factor."""
    a64 = a.double()
    if a.shape[-2] <= a.shape[-1]:
        return _ritz_left(_top_eigh(a64 @ a64.mT, rank)[1], a64)
    return _ritz_right(a64, _top_eigh(a64.mT @ a64, rank)[1])


def _randomized_svd(a: Tensor, rank: int, niter: int, oversample: int, gen: torch.Generator
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Halko et al.: Q spans A·(AᵀA)^q·Ω, then Rayleigh-Ritz on Qᵀ A."""
    m, n = a.shape[-2:]
    width = min(rank + oversample, m, n)
    omega = torch.randn(a.shape[0], n, width, generator=gen, dtype=a.dtype).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q).Q).Q
    u, s, vh = _ritz_left(q, a)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _randomized_common(blocks: Sequence[Tensor], rank: int, niter: int, oversample: int, dev: torch.device,
                       gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Range finder on M = [W_1|W_2|…] through Σ W_k (W_kᵀ Q), never building M."""
    out = blocks[0].shape[0]
    width = min(rank + oversample, out, sum(w.shape[1] for w in blocks))
    ws = [w.to(dev, torch.float32) for w in blocks]
    y = sum(w @ torch.randn(w.shape[1], width, generator=gen).to(dev) for w in ws)
    q = torch.linalg.qr(y).Q
    for _ in range(niter):
        q = torch.linalg.qr(sum(w @ (w.mT @ q) for w in ws)).Q
    # Qᵀ M Mᵀ Q is width×width: its float64 eigh is the Rayleigh-Ritz step on M.
    proj = [(q.mT @ w).double() for w in ws]
    vals, vecs = _top_eigh(sum(p @ p.mT for p in proj)[None], rank)
    return q @ vecs[0].to(q.dtype), vals[0].clamp_min(0).sqrt()


def _top_eigh(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The r largest eigenpairs of a (b, k, k) batch of symmetric matrices, in descending order."""
    if gram.device.type != "cpu":
        vals, vecs = torch.linalg.eigh(gram)
        return vals[..., -rank:].flip(-1), vecs[..., -rank:].flip(-1)
    # On CPU LAPACK's MRRR (syevr) computes only the wanted eigenvectors: several times faster than
    # torch.linalg.eigh (syevd), which builds all of them.
    k = gram.shape[-1]
    pairs = [scipy.linalg.eigh(g.numpy(), subset_by_index=[k - rank, k - 1], driver="evr", check_finite=False)
             for g in gram]
    vals = torch.stack([torch.from_numpy(v) for v, _ in pairs]).flip(-1)
    return vals, torch.stack([torch.from_numpy(v) for _, v in pairs]).flip(-1)


def _ritz_left(q: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of A restricted to the column space of Q (orthonormal, m×k): A ≈ Q Qᵀ A."""
    ub, s, vh = reduced_svd(q.mT @ a)
    return q @ ub, s, vh


def _ritz_right(a: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of A restricted to the row space of Q (orthonormal, n×k): A ≈ A Q Qᵀ."""
    u, s, vhb = reduced_svd(a @ q)
    return u, s, vhb @ q.mT


def _fix_signs(u: Tensor, vh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Flip singular pairs so the largest-magnitude entry of each column of U is positive."""
    pick = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(u.gather(-2, pick) < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, None if vh is None else vh * sign.mT


def _energy(s: Tensor, total: float) -> float:
    """Σ σ_i² over the kept values, relative to the squared Frobenius norm."""
    return float(s.double().square().sum()) / total if total > 0 else 0.0


def _bytes_per_matrix(m: int, n: int, width: int, algorithm: str, dtype: torch.dtype) -> int:
    """Rough peak working memory of one matrix of the batch."""
    k, item = min(m, n), torch.empty(0, dtype=dtype).element_size()
    if algorithm == "gram":
        # float64 copy, Gram and its eigenvectors, projection
        return 8 * (m * n + 2 * k * k + width * (m + n))
    if algorithm == "randomized":
        return item * (2 * m * n + 3 * width * (m + n))
    # input copy plus LAPACK's workspace, both factors
    return item * (2 * m * n + k * (m + n + 1))


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_algorithm(algorithm: str) -> None:
    """Refuse unknown algorithm names."""
    if algorithm not in ALGORITHMS:
        raise LrsError(f"unknown SVD algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def _check_rank(rank: int, m: int, n: int, what: str) -> None:
    """The rank must fit the matrix."""
    if not 1 <= rank <= min(m, n):
        raise LrsError(f"rank {rank} does not fit a {what} of shape {m}x{n} (must be between 1 and {min(m, n)})")
