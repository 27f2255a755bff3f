"""The Triton kernels against the torch references (interpreter on CPU), the references against PEFT."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. at their first import

import copy

import pytest
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraConfig
from peft.tuners.miss import MissConfig, MissLinear
from torch import nn

from lowrank_surgery import kernels
from lowrank_surgery.errors import LrsError
from lowrank_surgery.kernels.reference import fold

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every test runs the Triton path unless it says otherwise."""
    monkeypatch.setenv("LRS_KERNELS", "triton")


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """max |actual - expected| <= tol · max |expected|."""
    assert actual.shape == expected.shape
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol * expected.float().abs().max().item(), f"max abs error {err}"


def rand(*shape: int, grad: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random tensor on the test device."""
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def base(out: int, inp: int, *, bias: bool, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A frozen weight in (out, in) layout, as a transposed view when imitating GPT-2's Conv1D."""
    weight = rand(inp, out).t() if conv1d else rand(out, inp)
    return weight, rand(out) if bias else None


def mask_for(x: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    """The dropout multiplier the kernels apply to x."""
    return kernels.triton_dropout_mask(x.shape, p, seed, x.device) if p else None


def check_grads(y: torch.Tensor, y_ref: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """Forward and the gradients of every input needing one match the reference."""
    assert_rel(y, y_ref)
    g = torch.randn_like(y)
    wanted = [t for t in inputs if t.requires_grad]
    for got, want in zip(torch.autograd.grad(y, wanted, g), torch.autograd.grad(y_ref, wanted, g)):
        assert_rel(got, want)


# (leading dims of x, in, out, R): in not a multiple of the block, R not a power of two, R above one block,
# token counts not a multiple of the block.
LOWRANK_SHAPES = [((2, 37), 70, 50, 6), ((67,), 33, 129, 19), ((5, 3, 7), 20, 24, 130)]


@pytest.mark.parametrize("lead,inp,out,R", LOWRANK_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lowrank_matches_reference(lead, inp, out, R, p):
    x, A, B = rand(*lead, inp, grad=True), rand(R, inp, grad=True), rand(out, R, grad=True)
    weight, bias = base(out, inp, bias=out % 2 == 0, conv1d=inp == 33)
    y = kernels.lowrank_linear(x, weight, bias, A, B, 0.75, p, seed=11)
    y_ref = kernels.lowrank_linear_reference(x, weight, bias, A, B, 0.75, mask_for(x, p, 11))
    check_grads(y, y_ref, [x, A, B])


@pytest.mark.parametrize("b_trains", [True, False])
def test_lowrank_gradients_with_trainable_and_frozen_b(b_trains):
    """CoRA's frozen mode: with B frozen, x and A still get the right gradients; with B trainable, B gets its own."""
    x, A, B = rand(9, 40, grad=True), rand(5, 40, grad=True), rand(30, 5, grad=b_trains)
    weight, bias = base(30, 40, bias=True, conv1d=False)
    y = kernels.lowrank_linear(x, weight, bias, A, B, 2.0, 0.1, seed=3)
    y_ref = kernels.lowrank_linear_reference(x, weight, bias, A, B, 2.0, mask_for(x, 0.1, 3))
    check_grads(y, y_ref, [x, A, B])
    kernels.lowrank_linear(x, weight, bias, A, B, 2.0, 0.1, seed=3).sum().backward()
    assert A.grad is not None and (B.grad is not None) == b_trains


def test_lowrank_refuses_trainable_base_weight():
    x, A, B = rand(4, 8), rand(2, 8), rand(6, 2)
    with pytest.raises(ValueError, match="frozen"):
        kernels.lowrank_linear(x, rand(6, 8, grad=True), None, A, B, 1.0)


# (leading dims, in, out, r, mini_r): in % r != 0 (zero padding), r = 1, r not a power of two.
FOLD_SHAPES = [((3, 29), 70, 50, 9, None), ((41,), 33, 130, 1, None), ((2, 17), 40, 60, 13, 12)]


@pytest.mark.parametrize("lead,inp,out,r,mini_r", FOLD_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fold_matches_reference(lead, inp, out, r, mini_r, p):
    x, D = rand(*lead, inp, grad=True), rand(r, mini_r or out, grad=True)
    weight, bias = base(out, inp, bias=mini_r is None, conv1d=r == 1)
    y = kernels.fold_linear(x, weight, bias, D, r, mini_r, p, seed=5)
    y_ref = kernels.fold_linear_reference(x, weight, bias, D, r, mini_r, mask_for(x, p, 5))
    check_grads(y, y_ref, [x, D])


def test_fold_rejects_wrong_block_shape():
    with pytest.raises(ValueError, match="does not fit"):
        kernels.fold_linear(rand(2, 8), rand(6, 8), None, rand(3, 4), 3, mini_r=4)


# (leading dims, in, out, r): r below the 16-wide tile and not a power of two, r a full tile.
BAT_SHAPES = [((2, 33), 72, 60, 12), ((70,), 32, 48, 16)]


@pytest.mark.parametrize("lead,inp,out,r", BAT_SHAPES)
@pytest.mark.parametrize("bias,conv1d", [(True, False), (False, True)])
def test_bat_matches_reference(lead, inp, out, r, bias, conv1d):
    x, D = rand(*lead, inp, grad=True), (0.1 * rand(out // r, r, r)).requires_grad_()
    weight, b = base(out, inp, bias=bias, conv1d=conv1d)
    check_grads(kernels.bat_linear(x, weight, b, D), kernels.bat_linear_reference(x, weight, b, D), [x, D])


def test_bat_rejects_untileable_weight():
    with pytest.raises(ValueError, match="does not tile"):
        kernels.bat_linear(rand(2, 10), rand(8, 10), None, rand(2, 4, 4))


def test_split_reduction_matches_torch():
    """The long-reduction path (float32 partial sums) used for dA over many tokens."""
    from lowrank_surgery.kernels.matmul import matmul

    x, y, out = rand(20, 200), rand(200, 3), rand(20, 3)
    expected = out + 0.5 * x @ y
    assert_rel(matmul(x, y, out, scale=0.5, accumulate=True, splits=3), expected)
    assert_rel(matmul(x, y, torch.empty_like(out), splits=3), x @ y)


def test_dropout_mask_is_seeded_and_fair():
    a = kernels.triton_dropout_mask((300, 70), 0.25, 1, DEVICE)
    assert torch.equal(a, kernels.triton_dropout_mask((300, 70), 0.25, 1, DEVICE))
    assert not torch.equal(a, kernels.triton_dropout_mask((300, 70), 0.25, 2, DEVICE))
    assert torch.equal(a.unique(), torch.tensor([0.0, 1 / 0.75], device=DEVICE))
    assert abs((a == 0).float().mean().item() - 0.25) < 0.02


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_reproducible_from_seed(monkeypatch, backend):
    monkeypatch.setenv("LRS_KERNELS", backend)
    x, A, B, D = rand(6, 40), rand(4, 40), rand(24, 4), rand(5, 24)
    weight, bias = base(24, 40, bias=True, conv1d=False)
    runs = {
        "lowrank": lambda seed: kernels.lowrank_linear(x, weight, bias, A, B, 1.0, 0.5, seed),
        "fold": lambda seed: kernels.fold_linear(x, weight, bias, D, 5, None, 0.5, seed),
    }
    for name, run in runs.items():
        assert torch.equal(run(7), run(7)), name
        assert not torch.allclose(run(7), run(8)), name
        torch.manual_seed(0)
        unseeded = run(None)
        torch.manual_seed(0)
        assert torch.equal(unseeded, run(None)), name


def test_torch_backend_is_lora_with_its_dropout_mask(monkeypatch):
    """The torch path, forward and backward, against the LoRA formula written out in plain torch."""
    monkeypatch.setenv("LRS_KERNELS", "torch")
    x, A, B = rand(6, 40, grad=True), rand(4, 40, grad=True), rand(24, 4, grad=True)
    weight, bias = base(24, 40, bias=True, conv1d=False)
    keep = kernels.torch_dropout_mask(x.shape, 0.3, 9, x.device)
    assert keep.unique().tolist() == pytest.approx([0.0, 1 / 0.7])  # dropout: dropped or scaled by 1/(1-p)
    y = kernels.lowrank_linear(x, weight, bias, A, B, 1.5, 0.3, 9)
    check_grads(y, x @ weight.T + bias + 1.5 * ((x * keep) @ A.T) @ B.T, [x, A, B])


def test_autocast_sets_the_compute_dtype(monkeypatch):
    monkeypatch.setenv("LRS_KERNELS", "torch")
    x, A, B = torch.randn(6, 40, requires_grad=True), torch.randn(4, 40, requires_grad=True), torch.randn(24, 4)
    weight = torch.randn(24, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lowrank_linear(x, weight, None, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == A.grad.dtype == torch.float32


def test_backend_honours_lrs_kernels(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("LRS_KERNELS", "torch")
    assert kernels.backend(cuda) == "torch"
    monkeypatch.setenv("LRS_KERNELS", "auto")
    big = kernels.AUTO_MIN_ROWS
    assert (kernels.backend(cpu, rows=big), kernels.backend(cuda, rows=big)) == ("torch", "triton")
    monkeypatch.delenv("LRS_KERNELS")
    assert kernels.backend(cpu) == "torch"
    monkeypatch.setenv("LRS_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.backend(cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(LrsError, match="TRITON_INTERPRET=1"):
        kernels.backend(cpu)
    monkeypatch.setenv("LRS_KERNELS", "cuda")
    with pytest.raises(LrsError, match="auto, triton, torch"):
        kernels.backend(cpu)


# ------------------------------------------------------------------ references: gradcheck and PEFT as oracle


def test_references_gradcheck():
    def d(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, b, mask = d(2, 3, 10), torch.randn(8, 10, dtype=torch.float64), d(8), torch.rand(2, 3, 10).double()
    assert torch.autograd.gradcheck(
        lambda x, A, B: kernels.lowrank_linear_reference(x, w, b, A, B, 0.5, mask), (x, d(3, 10), d(8, 3)))
    assert torch.autograd.gradcheck(
        lambda x, D: kernels.fold_linear_reference(x, w, b, D, 4, None, mask), (x, d(4, 8)))
    assert torch.autograd.gradcheck(
        lambda x, D: kernels.fold_linear_reference(x, w, None, D, 3, 2), (x, d(3, 2)))
    assert torch.autograd.gradcheck(lambda x, D: kernels.bat_linear_reference(x, w, b, D), (x, d(4, 2, 2)))


class FixedMask(nn.Module):
    """Stands in for PEFT's nn.Dropout: multiplies by a given mask, zero-padded to the input's width."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.pad(self.mask, (0, x.shape[-1] - self.mask.shape[-1]))


def test_lowrank_reference_is_peft_lora():
    base_layer = nn.Linear(30, 20)
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.5)
    layer = LoraLinear(copy.deepcopy(base_layer), "default", config, r=4, lora_alpha=12)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 30)
    mask = kernels.torch_dropout_mask(x.shape, 0.5, 1, x.device)
    layer.lora_dropout["default"] = FixedMask(mask)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = kernels.lowrank_linear_reference(x, base_layer.weight, base_layer.bias, A, B, 3.0, mask)
    assert_rel(layer(x), expected)


def miss_layer(inp: int, out: int, r: int, variant: str | bool, mini_r: int = 1) -> MissLinear:
    """A PEFT MiSS layer with a random block and 0.5 dropout, in training mode."""
    config = MissConfig(r=r, init_weights=variant, mini_r=mini_r, miss_dropout=0.5)
    layer = MissLinear(nn.Linear(inp, out), "default", config, r=r).train()
    nn.init.normal_(layer.miss_block["default"], std=0.1)
    return layer


@pytest.mark.parametrize("mini_r", [None, 6])
def test_fold_reference_is_peft_miss(mini_r):
    layer = miss_layer(23, 18, 5, "mini" if mini_r else True, mini_r or 1)
    x = torch.randn(4, 23)
    mask = kernels.torch_dropout_mask(x.shape, 0.5, 2, x.device)
    layer.miss_dropout["default"] = FixedMask(mask)
    lin = layer.get_base_layer()
    expected = kernels.fold_linear_reference(x, lin.weight, lin.bias, layer.miss_block["default"], 5, mini_r, mask)
    assert_rel(layer(x), expected)


def test_bat_reference_is_peft_miss_without_dropout():
    layer = miss_layer(12, 8, 4, "bat")
    x = torch.randn(2, 3, 12)
    lin = layer.get_base_layer()
    expected = kernels.bat_linear_reference(x, lin.weight, lin.bias, layer.miss_block["default"])
    assert_rel(layer(x), expected)  # PEFT's bat forward ignores miss_dropout even in training mode


def test_fold_is_pad_and_sum():
    x = torch.arange(7.0)
    assert fold(x, 3).tolist() == [0 + 3 + 6, 1 + 4, 2 + 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_gpu(dtype):
    x, A, B, D = rand(2, 300, 256, dtype=dtype), rand(16, 256, dtype=dtype), rand(192, 16, dtype=dtype), \
        rand(3, 192, dtype=dtype)
    weight, bias = base(192, 256, bias=True, conv1d=True)
    half = [t.to(dtype) for t in (weight, bias)]
    assert_rel(kernels.lowrank_linear(x, *half, A, B, 0.5),
               kernels.lowrank_linear_reference(x.float(), weight, bias, A.float(), B.float(), 0.5), 2e-2)
    assert_rel(kernels.fold_linear(x, *half, D, 3),
               kernels.fold_linear_reference(x.float(), weight, bias, D.float(), 3), 2e-2)
    Db = 0.1 * rand(12, 16, 16)
    assert_rel(kernels.bat_linear(x, *half, Db.to(dtype)),
               kernels.bat_linear_reference(x.float(), weight, bias, Db), 2e-2)


# ------------------------------------------------------------------ a kernel that fails on the user's GPU


class Broken:
    """Stands in for a Triton kernel that cannot be built or launched on this GPU."""

    arg_names: list = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("out of resources: shared memory, required: 300000\nsecond line")
        return launch


@pytest.fixture
def auto_with_triton(monkeypatch):
    """LRS_KERNELS=auto as on a CUDA machine: Triton first, torch when it fails; fresh failure records."""
    from lowrank_surgery.kernels import fallback, matmul

    monkeypatch.setattr(fallback, "strict", lambda: False)
    monkeypatch.setattr(fallback, "_WARNED", set())
    monkeypatch.setattr(matmul, "_FAILED", set())
    monkeypatch.setattr(kernels, "_BROKEN", set())
    return matmul


def test_failed_matmul_falls_back_to_torch_with_the_kernels_dropout(auto_with_triton, monkeypatch):
    monkeypatch.setattr(auto_with_triton, "_mm_kernel", Broken())
    x, A, B = rand(3, 7, 40, grad=True), rand(5, 40, grad=True), rand(24, 5, grad=True)
    weight, bias = base(24, 40, bias=True, conv1d=False)
    with pytest.warns(RuntimeWarning, match=r"Triton matmul kernel failed \(RuntimeError: out of resources.*"
                                            r"LRS_KERNELS=torch") as caught:
        y = kernels.lowrank_linear(x, weight, bias, A, B, 0.5, 0.3, seed=4)
        check_grads(y, kernels.lowrank_linear_reference(x, weight, bias, A, B, 0.5, mask_for(x, 0.3, 4)), [x, A, B])
        y2 = kernels.fold_linear(x, weight, bias, rand(6, 24), 6, None, 0.3, seed=4)
    assert len(caught) == 1 and "second line" not in str(caught[0].message)
    assert y2.shape == y.shape


def test_failed_kernel_family_falls_back_to_the_reference(auto_with_triton, monkeypatch):
    monkeypatch.setattr(auto_with_triton, "_mm_kernel", Broken())
    monkeypatch.setattr(auto_with_triton, "_mask_kernel", Broken())  # not even the mask can be drawn
    x, A, B = rand(9, 40, grad=True), rand(5, 40, grad=True), rand(24, 5, grad=True)
    weight, bias = base(24, 40, bias=False, conv1d=True)
    with pytest.warns(RuntimeWarning, match="Triton lowrank kernel failed"):
        y = kernels.lowrank_linear(x, weight, bias, A, B, 0.5, 0.3, seed=4)
    assert ("lowrank", DEVICE.type) in kernels._BROKEN
    expected = kernels.lowrank_linear_reference(x, weight, bias, A, B, 0.5, kernels.torch_dropout_mask(x.shape, 0.3, 4, x.device))
    check_grads(y, expected, [x, A, B])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next call goes straight to torch, quietly
        assert torch.equal(kernels.lowrank_linear(x, weight, bias, A, B, 0.5, 0.3, seed=4), y)


def test_failed_bat_kernel_falls_back(auto_with_triton, monkeypatch):
    from lowrank_surgery.kernels import bat

    monkeypatch.setattr(bat, "_bat_kernel", Broken())
    x, D = rand(2, 5, 32, grad=True), (0.1 * rand(3, 16, 16)).requires_grad_()
    weight, bias = base(48, 32, bias=True, conv1d=False)
    with pytest.warns(RuntimeWarning, match="Triton bat kernel failed"):
        y = kernels.bat_linear(x, weight, bias, D)
    check_grads(y, kernels.bat_linear_reference(x, weight, bias, D), [x, D])


def test_explicit_triton_raises_instead_of_falling_back(monkeypatch):
    from lowrank_surgery.kernels import matmul

    monkeypatch.setattr(matmul, "_mm_kernel", Broken())
    monkeypatch.setattr(matmul, "_FAILED", set())
    x, A, B = rand(4, 8), rand(2, 8), rand(6, 2)
    with pytest.raises(RuntimeError, match="out of resources"):
        kernels.lowrank_linear(x, rand(6, 8), None, A, B, 1.0)


def test_auto_takes_triton_only_where_it_measured_no_slower(monkeypatch):
    monkeypatch.setenv("LRS_KERNELS", "auto")
    cuda, big = torch.device("cuda"), kernels.AUTO_MIN_ROWS
    assert [kernels.backend(cuda, k, big) for k in ("lowrank", "fold", "bat")] == ["triton", "triton", "torch"]
    assert kernels.backend(cuda, "lowrank", big - 1) == kernels.backend(cuda, "fold", big, 0.1) == "torch"
    monkeypatch.setenv("LRS_KERNELS", "triton")
    assert kernels.backend(cuda, "lowrank", 1, 0.1) == "triton"


# ------------------------------------------------------------------ half precision on the torch path (CPU)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_precision_torch_path_matches_float32(monkeypatch, dtype, tol):
    """bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 2e-3 per operation), fp16 11 bits (2^-12 ≈ 2.4e-4);
    the tolerances allow the error of sums over a few hundred terms relative to the output's largest entry."""
    monkeypatch.setenv("LRS_KERNELS", "torch")
    x, A, B, D = (torch.randn(*s) for s in ((2, 30, 256), (16, 256), (192, 16), (3, 192)))
    Db = 0.1 * torch.randn(12, 16, 16)
    weight, bias = torch.randn(192, 256) / 16, torch.randn(192)
    mask = kernels.torch_dropout_mask(x.shape, 0.2, 3, x.device)
    half = [t.to(dtype).requires_grad_() for t in (x, A, B, D, Db)]
    hx, hA, hB, hD, hDb = half
    hw, hb = weight.to(dtype), bias.to(dtype)
    full = [t.clone().requires_grad_() for t in (x, A, B, D, Db)]
    fx, fA, fB, fD, fDb = full
    pairs = [
        (kernels.lowrank_linear(hx, hw, hb, hA, hB, 0.5, 0.2, seed=3),
         kernels.lowrank_linear_reference(fx, hw.float(), hb.float(), fA, fB, 0.5, mask)),
        (kernels.fold_linear(hx, hw, hb, hD, 3, None, 0.2, seed=3),
         kernels.fold_linear_reference(fx, hw.float(), hb.float(), fD, 3, None, mask)),
        (kernels.bat_linear(hx, hw, hb, hDb), kernels.bat_linear_reference(fx, hw.float(), hb.float(), fDb)),
    ]
    for got, want in pairs:
        assert got.dtype == dtype
        assert_rel(got, want, tol)
        g = torch.randn_like(want)
        for gh, gf in zip(torch.autograd.grad(got, [t for t in half if t.grad_fn is None], g.to(dtype), allow_unused=True),
                          torch.autograd.grad(want, full, g, allow_unused=True)):
            if gh is not None:
                assert gh.dtype == dtype
                assert_rel(gh, gf, 2 * tol)
