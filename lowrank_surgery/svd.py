"""Batched truncated SVD and common-subspace (CoRA) extraction: pure tensors in, CPU tensors out.

Algorithms:
- `exact`: reduced `torch.linalg.svd`, same-shape matrices stacked into one batch.
- `gram`: the top r + oversample eigenvectors of the smaller Gram matrix (A Aᵀ or AᵀA), formed in float32
  with a symmetric rank-k update (half a matrix product) and solved by LAPACK's MRRR for those vectors only;
  then one refinement against A itself: a power step (Aᵀ Q, re-orthonormalised) and Rayleigh-Ritz (a small SVD
  of A·P) for the singular values and both factors. On flat spectra (Gaussian 4096x4096, the worst case) the
  basis lands 2e-6 to 2e-5 rad from a float64 SVD, closer than a float32 SVD does, and the captured energy
  within 1e-10 (tests/test_svd.py, README "At 8B"). When λ_r < 1e-4·λ₁ the float32 Gram's rounding (~1e-7·λ₁) would blur the wanted vectors, so
  the Gram is formed again in float64. The float64 Gram and its eigh took twice as long: the eigensolver
  (memory-bound tridiagonalisation), not the product, dominates, and float32 halves both.
- `randomized`: Halko, Martinsson & Tropp range finder with oversampling and power iterations, each
  re-orthonormalised by QR, followed by the same Rayleigh-Ritz step.
Signs are fixed so that the largest-magnitude entry of every column of U is positive.

`lowrank_factors` turns a truncated SVD into LoRA factors (B, A), for PiSSA's init, extract-lora and convert's
truncation alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import scipy.linalg
import scipy.linalg.blas
import torch
from torch import Tensor

from .device import resolve_device
from .errors import LrsError

ALGORITHMS = ("exact", "gram", "randomized")
SEED = 0
FLOAT32_RESOLVES = 1e-4  # λ_r/λ₁ below which a float32 Gram's rounding blurs the top eigenvectors


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
        return acc.result(rank, lambda: blocks, oversample)
    dev = resolve_device(device)
    if algorithm == "exact":
        u, s, _ = reduced_svd(torch.cat([w.to(dev, torch.float32) for w in blocks], dim=1))
        u, s = u[:, :rank], s[:rank]
    else:
        gen = generator if generator is not None else torch.Generator().manual_seed(SEED)
        u, s = _randomized_common(blocks, rank, niter, oversample, dev, gen)
    total = sum(squared_norm(w) for w in blocks)
    u, _ = _fix_signs(u[None], None)
    return u[0].float().cpu(), s.float().cpu(), _energy(s, total)


class GramAccumulator:
    """Streams matrices W (out × in_k) into G = Σ W Wᵀ (float32) on the device; `result` gives the common basis."""

    def __init__(self, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32) -> None:
        self.device = resolve_device(device)
        self.dtype = dtype
        self.gram: Tensor | None = None
        self.columns = 0

    def add(self, w: Tensor) -> None:
        """Accumulate W Wᵀ."""
        if w.ndim != 2 or (self.gram is not None and w.shape[0] != self.gram.shape[0]):
            rows = "" if self.gram is None else f" with {self.gram.shape[0]} rows"
            raise LrsError(f"cannot accumulate a matrix of shape {tuple(w.shape)} into a Gram matrix{rows}")
        self.gram = gram_matrix(w.to(self.device, self.dtype), left=True, into=self.gram)
        self.columns += w.shape[1]

    def result(self, rank: int, blocks: Callable[[], Iterable[Tensor]], oversample: int = 8
               ) -> tuple[Tensor, Tensor, float]:
        """(U_r float32 out×r, S_r float32 r, captured energy Σ_{i≤r}σ_i² / Σσ_i²), refined against the matrices
        added, which `blocks()` yields again (twice)."""
        if self.gram is None:
            raise LrsError("common basis needs at least one matrix")
        out = self.gram.shape[0]
        _check_rank(rank, out, self.columns, "concatenation")
        vals, q = _top_eigh(self.gram[None], min(rank + oversample, out, self.columns))
        if self.dtype != torch.float64 and _blurred(vals[0], rank):
            wide = GramAccumulator(self.device, torch.float64)
            for w in blocks():
                wide.add(w)
            return wide.result(rank, blocks, oversample)
        u, s = _refine_common(q[0].to(self.dtype), blocks, self.device)
        total = float(self.gram.diagonal().double().sum())  # ‖M‖²_F: BLAS sums each diagonal entry to ~1e-8
        u, _ = _fix_signs(u[None, :, :rank], None)
        return u[0].float().cpu(), s[:rank].float().cpu(), _energy(s[:rank], total)


def gram_matrix(a: Tensor, left: bool, into: Tensor | None = None) -> Tensor:
    """A Aᵀ (`left`) or AᵀA of a 2-D matrix, added to `into` when given; on the CPU only the upper triangle is
    filled (BLAS syrk: half the work of a product), which is all `_top_eigh` reads."""
    if a.device.type != "cpu":
        g = a @ a.mT if left else a.mT @ a
        return g if into is None else into.add_(g)
    syrk = scipy.linalg.blas.dsyrk if a.dtype == torch.float64 else scipy.linalg.blas.ssyrk
    # a.numpy().T is Aᵀ in Fortran order, which BLAS reads without a copy; C stays in Fortran order
    c = None if into is None else into.numpy()
    g = syrk(1.0, a.contiguous().numpy().T, beta=0.0 if into is None else 1.0, c=c, trans=int(left),
             overwrite_c=True)
    return torch.from_numpy(g) if into is None else into


def _batched_svd(a: Tensor, rank: int, algorithm: str, niter: int, oversample: int, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r SVD of a (b, m, n) batch."""
    if algorithm == "exact":
        u, s, vh = reduced_svd(a)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    if algorithm == "gram":
        return _gram_svd(a, rank, oversample)
    return _randomized_svd(a, rank, niter, oversample, gen)


def _gram_svd(a: Tensor, rank: int, oversample: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top eigenvectors of the smaller Gram, then a power step and Rayleigh-Ritz against `a`, in `a`'s precision."""
    m, n = a.shape[-2:]
    left = m <= n
    gram = torch.stack([gram_matrix(x, left) for x in a])
    vals, q = _top_eigh(gram, min(rank + oversample, m, n))
    if a.dtype != torch.float64 and any(_blurred(v, rank) for v in vals):
        return _gram_svd(a.double(), rank, oversample)
    q = q.to(a.device, a.dtype)
    if left:  # Q spans the column space: a power step to the row space, then Rayleigh-Ritz there
        u, s, vh = _ritz_right(a, torch.linalg.qr(a.mT @ q).Q)
    else:
        u, s, vh = _ritz_left(torch.linalg.qr(a @ q).Q, a)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _blurred(vals: Tensor, rank: int) -> bool:
    """Whether the wanted eigenvalues sink into a float32 Gram's rounding (λ_r < 1e-4·λ₁)."""
    return bool(vals[rank - 1] < FLOAT32_RESOLVES * vals[0])


def _refine_common(q: Tensor, blocks: Callable[[], Iterable[Tensor]], dev: torch.device) -> tuple[Tensor, Tensor]:
    """One power step and Rayleigh-Ritz on M = [W_1|W_2|…] from a start basis Q (out × k), in Q's precision: P spans
    MᵀQ, U and S come from the SVD of M P = Σ W_k P_k. Reads the blocks twice."""
    q = q.to(dev)
    p = torch.linalg.qr(torch.cat([w.to(dev, q.dtype).mT @ q for w in blocks()])).Q
    y, start = torch.zeros_like(q), 0
    for w in blocks():
        y.addmm_(w.to(dev, q.dtype), p[start:start + w.shape[1]])
        start += w.shape[1]
    u, s, _ = reduced_svd(y.double())  # out × k, in float64 as _small_svd
    return u, s


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
    if sum(w.shape[1] for w in ws) >= 2 * out:  # M is wide: G = M Mᵀ once costs less than 2 products per step
        gram = sum(w @ w.mT for w in ws)
        step = lambda q: gram @ q  # noqa: E731
    else:
        step = lambda q: sum(w @ (w.mT @ q) for w in ws)  # noqa: E731
    for _ in range(niter):
        q = torch.linalg.qr(step(q)).Q
    # Qᵀ M Mᵀ Q is width×width: its float64 eigh is the Rayleigh-Ritz step on M.
    vals, vecs = _top_eigh((q.mT @ step(q)).double()[None], rank)
    return q @ vecs[0].to(q.dtype), vals[0].clamp_min(0).sqrt()


def _top_eigh(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest eigenpairs of a (b, n, n) batch of symmetric matrices (upper triangles read), descending."""
    if gram.device.type != "cpu":
        vals, vecs = torch.linalg.eigh(gram, UPLO="U")
        return vals[..., -k:].flip(-1), vecs[..., -k:].flip(-1)
    # On CPU LAPACK's MRRR (syevr) computes only the wanted eigenvectors: several times faster than
    # torch.linalg.eigh (syevd), which builds all of them.
    n = gram.shape[-1]
    pairs = [scipy.linalg.eigh(g.numpy(), lower=False, subset_by_index=[n - k, n - 1], driver="evr",
                               check_finite=False) for g in gram]
    vals = torch.stack([torch.from_numpy(v) for v, _ in pairs]).flip(-1)
    return vals, torch.stack([torch.from_numpy(v) for _, v in pairs]).flip(-1)


def _ritz_left(q: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of A restricted to the column space of Q (orthonormal, m×k): A ≈ Q Qᵀ A."""
    ub, s, vh = _small_svd(q.mT @ a)
    return q @ ub, s, vh


def _ritz_right(a: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of A restricted to the row space of Q (orthonormal, n×k): A ≈ A Q Qᵀ."""
    u, s, vhb = _small_svd(a @ q)
    return u, s, vhb @ q.mT


def _small_svd(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD of a k-wide projection in float64, back in its dtype: its top singular values are close, and a
    float32 SVD would mix their vectors by ~1e-7·σ₁/(σ_i − σ_{i+1})."""
    u, s, vh = reduced_svd(b.double())
    return u.to(b.dtype), s.to(b.dtype), vh.to(b.dtype)


def _fix_signs(u: Tensor, vh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Flip singular pairs so the largest-magnitude entry of each column of U is positive."""
    pick = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(u.gather(-2, pick) < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, None if vh is None else vh * sign.mT


def squared_norm(t: Tensor) -> float:
    """‖t‖²_F accumulated in float64, a block of rows at a time: no float64 copy of a weight-sized tensor."""
    rows = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)
    step = max(1, 2**21 // max(1, rows.shape[1]))  # ~16 MB of float64 per block
    return sum((float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2 for block in rows.split(step)), 0.0)


def _energy(s: Tensor, total: float) -> float:
    """Σ σ_i² over the kept values, relative to the squared Frobenius norm."""
    return float(s.double().square().sum()) / total if total > 0 else 0.0


def _bytes_per_matrix(m: int, n: int, width: int, algorithm: str, dtype: torch.dtype) -> int:
    """Rough peak working memory of one matrix of the batch."""
    k, item = min(m, n), torch.empty(0, dtype=dtype).element_size()
    if algorithm == "gram":
        # float64 copy for the refinement, Gram and its eigenvectors, projections
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
