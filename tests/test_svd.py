"""The batched SVD engine against numpy: projectors, singular values, planted subspaces, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lowrank_surgery.device import resolve_device
from lowrank_surgery.errors import LrsError
from lowrank_surgery.svd import ALGORITHMS, GramAccumulator, common_basis, truncated_svd

EXACT = ("exact", "gram")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: extra BLAS threads only fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def decaying(m: int, n: int, seed: int = 0, decay: float = 0.9) -> torch.Tensor:
    """A matrix with a geometric spectrum, so the top-r subspace is well separated."""
    u = torch.linalg.qr(randn(m, m, seed=seed)).Q
    v = torch.linalg.qr(randn(n, n, seed=seed + 1)).Q
    k = min(m, n)
    return (u[:, :k] * decay ** torch.arange(k, dtype=torch.float32)) @ v[:, :k].T


def projector(u: np.ndarray) -> np.ndarray:
    return u @ u.T


def numpy_svd(a: torch.Tensor, r: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, _ = np.linalg.svd(a.double().numpy(), full_matrices=False)
    return u[:, :r], s[:r]


@pytest.mark.parametrize("algorithm", EXACT)
@pytest.mark.parametrize("shape", [(48, 48), (24, 72), (96, 40)])
def test_exact_routes_match_numpy(algorithm: str, shape: tuple[int, int]) -> None:
    a, r = decaying(*shape), 8
    (u, s, vh), = truncated_svd([a], r, algorithm=algorithm, device="cpu")
    ref_u, ref_s = numpy_svd(a, r)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5)
    np.testing.assert_allclose(projector(u.double().numpy()), projector(ref_u), atol=1e-5)
    np.testing.assert_allclose(u.T @ u, torch.eye(r), atol=1e-5)
    np.testing.assert_allclose(vh @ vh.T, torch.eye(r), atol=1e-5)
    truncation = ref_u @ (ref_u.T @ a.double().numpy())
    np.testing.assert_allclose((u * s) @ vh, truncation, atol=1e-5)


def test_gram_is_accurate_on_ill_conditioned_tail() -> None:
    a = decaying(64, 160, decay=0.6)  # σ_16/σ_1 ≈ 5e-4: squaring gives 2.5e-7, fine in float64
    (u, s, _), = truncated_svd([a], 16, algorithm="gram", device="cpu")
    ref_u, ref_s = numpy_svd(a, 16)
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5)
    np.testing.assert_allclose(projector(u.double().numpy()), projector(ref_u), atol=1e-5)


def flat(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian: the flattest spectrum, whose close top singular values a float32 Gram alone blurs (~1e-3 rad)."""
    return randn(m, n, seed=seed) * 0.02


def largest_angle(u: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.max(scipy.linalg.subspace_angles(u.double().numpy(), ref)))


@pytest.mark.parametrize("shape", [(512, 768), (768, 512)])
def test_gram_matches_a_float64_svd_on_a_flat_spectrum(shape: tuple[int, int]) -> None:
    """Close top singular values (Gaussian weights): the float32 Gram, refined against A, lands closer to a float64
    SVD than a float32 SVD does; its singular values and captured energy are float64's to float32 precision."""
    a, r = flat(*shape), 32
    u64, s64, vh64 = np.linalg.svd(a.double().numpy(), full_matrices=False)
    (u, s, vh), = truncated_svd([a], r, algorithm="gram", device="cpu")
    (ue, _, _), = truncated_svd([a], r, algorithm="exact", device="cpu")
    float32_svd = largest_angle(ue, u64[:, :r])
    gram_angle = max(largest_angle(u, u64[:, :r]), largest_angle(vh.T, vh64[:r].T))
    assert gram_angle < 1e-5 and gram_angle < float32_svd / 4
    np.testing.assert_allclose(s.numpy(), s64[:r], rtol=1e-6)
    basis, _, energy = common_basis([a[:, :300], a[:, 300:]], r, algorithm="gram", device="cpu")
    assert largest_angle(basis, u64[:, :r]) < min(5e-5, float32_svd)
    assert energy == pytest.approx(float((s64[:r] ** 2).sum() / (s64 ** 2).sum()), abs=1e-7)


def test_gram_falls_back_to_float64_below_float32_resolution() -> None:
    """σ_16/σ_1 ≈ 5e-4 puts λ_16 at 2.5e-7·λ_1, inside a float32 Gram's rounding: the float64 Gram takes over."""
    a = decaying(64, 160, decay=0.6).double()
    (u, s, _), = truncated_svd([a], 16, algorithm="gram", device="cpu", dtype=torch.float64)
    ref_u, ref_s = numpy_svd(a, 16)
    assert largest_angle(u, ref_u) < 1e-8
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-9)
    blocks = [a[:, :80], a[:, 80:]]
    u, s, _ = common_basis(blocks, 16, algorithm="gram", device="cpu")
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5)
    assert largest_angle(u, ref_u) < 1e-5


def test_signs_are_deterministic() -> None:
    a = randn(30, 50)
    for algorithm in ALGORITHMS:
        (u, _, vh), = truncated_svd([a], 5, algorithm=algorithm, device="cpu")
        top = u.abs().argmax(dim=0)
        assert (u[top, torch.arange(5)] > 0).all()

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_negated_matrix_keeps_u_and_flips_vh(algorithm: str) -> None:
    """-a = U·S·(-Vh): the sign rule fixes U by U alone, so -a gets the same U and the negated Vh."""
    a = decaying(30, 50)
    (u1, s1, v1), = truncated_svd([a], 5, algorithm=algorithm, device="cpu")
    (u2, s2, v2), = truncated_svd([-a], 5, algorithm=algorithm, device="cpu")
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u2, u1, rtol=0, atol=1e-4)
    torch.testing.assert_close(v2, -v1, rtol=0, atol=1e-4)


def test_float64_on_request() -> None:
    a = decaying(40, 30)
    for algorithm in ALGORITHMS:
        (u, s, vh), = truncated_svd([a], 6, algorithm=algorithm, device="cpu", dtype=torch.float64)
        assert u.dtype == s.dtype == vh.dtype == torch.float64
        np.testing.assert_allclose(s.numpy(), numpy_svd(a, 6)[1], rtol=1e-9 if algorithm != "randomized" else 1e-5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_batching_by_memory_budget_matches_one_by_one(algorithm: str) -> None:
    mats = [decaying(32, 48, seed=k) for k in range(5)] + [decaying(48, 32, seed=9), decaying(32, 48, seed=7)]
    whole = truncated_svd(mats, 4, algorithm=algorithm, device="cpu")
    tiny = truncated_svd(mats, 4, algorithm=algorithm, device="cpu", memory_budget=1)
    for (u, s, vh), (u1, s1, vh1), a in zip(whole, tiny, mats):
        assert u.shape == (a.shape[0], 4) and vh.shape == (4, a.shape[1])
        torch.testing.assert_close(s, s1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u @ u.T, u1 @ u1.T, rtol=0, atol=1e-5)
        torch.testing.assert_close((u * s) @ vh, (u1 * s1) @ vh1, rtol=0, atol=1e-5)


def planted(m: int, n: int, r: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r signal with singular values 10..1 plus small Gaussian noise; returns (matrix, true basis)."""
    basis = torch.linalg.qr(randn(m, r, seed=seed)).Q
    right = torch.linalg.qr(randn(n, r, seed=seed + 1)).Q
    signal = (basis * torch.linspace(10, 1, r)) @ right.T
    return signal + noise * randn(m, n, seed=seed + 2) / (m * n) ** 0.25, basis


def test_randomized_recovers_planted_subspace() -> None:
    a, basis = planted(200, 300, 10, noise=1e-2)
    (u, _, _), = truncated_svd([a], 10, algorithm="randomized", device="cpu")
    assert np.max(scipy.linalg.subspace_angles(u.numpy(), basis.numpy())) < 1e-2
    (ue, se, _), = truncated_svd([a], 10, device="cpu")
    (_, sr, _), = truncated_svd([a], 10, algorithm="randomized", device="cpu")
    energy = lambda s: float(s.double().square().sum())  # noqa: E731
    assert abs(energy(sr) - energy(se)) / energy(se) < 1e-3


def concat_reference(blocks: list[torch.Tensor], r: int) -> tuple[np.ndarray, np.ndarray, float]:
    m = torch.cat(blocks, dim=1).double().numpy()
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return u[:, :r], s[:r], float((s[:r] ** 2).sum() / (s ** 2).sum())


@pytest.mark.parametrize("algorithm", EXACT)
@pytest.mark.parametrize("widths", [(64, 64, 64), (256, 256), (40, 96, 200)])
def test_common_basis_matches_numpy_of_concatenation(algorithm: str, widths: tuple[int, ...]) -> None:
    out, r = 64, 12  # 64×256 blocks: GQA k/v shapes, out < in
    spectrum = 0.9 ** torch.arange(out, dtype=torch.float32)
    shared = torch.linalg.qr(randn(out, out, seed=5)).Q * spectrum
    blocks = [shared @ randn(out, w, seed=k) / w ** 0.5 for k, w in enumerate(widths)]
    u, s, energy = common_basis(blocks, r, algorithm=algorithm, device="cpu")
    ref_u, ref_s, ref_energy = concat_reference(blocks, r)
    assert u.shape == (out, r) and u.dtype == s.dtype == torch.float32
    np.testing.assert_allclose(projector(u.double().numpy()), projector(ref_u), atol=1e-5)
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5)
    np.testing.assert_allclose(u.T @ u, torch.eye(r), atol=1e-5)
    assert energy == pytest.approx(ref_energy, rel=1e-6)


def test_common_basis_randomized_recovers_planted_subspace() -> None:
    parts = [planted(96, w, 8, noise=1e-2, seed=0) for w in (96, 300, 150)]
    blocks, basis = [p[0] for p in parts], parts[0][1]
    u, s, energy = common_basis(blocks, 8, algorithm="randomized", device="cpu")
    assert np.max(scipy.linalg.subspace_angles(u.numpy(), basis.numpy())) < 1e-2
    np.testing.assert_allclose(u.T @ u, torch.eye(8), atol=1e-5)
    _, _, exact_energy = common_basis(blocks, 8, algorithm="exact", device="cpu")
    assert energy == pytest.approx(exact_energy, rel=1e-3)


def test_gram_accumulator_streams_like_common_basis() -> None:
    blocks = [randn(32, w, seed=w) for w in (32, 80, 16)]
    acc = GramAccumulator("cpu")
    for b in blocks:
        acc.add(b)
    reads = []

    def again():  # the refinement reads the blocks twice more
        reads.append(1)
        return iter(blocks)

    u, s, energy = acc.result(6, again)
    assert len(reads) == 2
    u2, s2, energy2 = common_basis(blocks, 6, algorithm="exact", device="cpu")
    torch.testing.assert_close(u @ u.T, u2 @ u2.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-6)
    assert energy == pytest.approx(energy2, rel=1e-6)
    assert acc.result(32, again)[2] == pytest.approx(1.0)


def test_rank_too_large_and_bad_input_raise() -> None:
    with pytest.raises(LrsError, match="8x12"):
        truncated_svd([randn(8, 12)], 9)
    with pytest.raises(LrsError, match="rank 0"):
        truncated_svd([randn(8, 12)], 0)
    with pytest.raises(LrsError, match="16x"):
        common_basis([randn(16, 32), randn(16, 8)], 17)
    with pytest.raises(LrsError, match="share their rows"):
        common_basis([randn(16, 32), randn(8, 32)], 4)
    with pytest.raises(LrsError, match="unknown SVD algorithm"):
        truncated_svd([randn(8, 12)], 2, algorithm="lanczos")
    acc = GramAccumulator("cpu")
    acc.add(randn(16, 4))
    with pytest.raises(LrsError, match="16x4"):
        acc.result(5, lambda: [])
    with pytest.raises(LrsError, match="16 rows"):
        acc.add(randn(8, 4))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LrsError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(LrsError, match="unknown device"):
        resolve_device("tpu9")


def test_empty_input_and_half_precision_input() -> None:
    assert truncated_svd([], 3) == []
    a = decaying(24, 36).bfloat16()
    (u, s, _), = truncated_svd([a], 4, algorithm="gram", device="cpu")
    np.testing.assert_allclose(s.numpy(), numpy_svd(a.float(), 4)[1], rtol=1e-5)
