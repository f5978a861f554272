"""CUDA checks: the speed options change nothing but speed (run with ``pytest -m gpu tests/gpu``).

Skipped without a GPU. ``SCOREFLOW_GPU_TEST_DEVICE=cpu pytest -m gpu tests/gpu`` runs the same checks on the CPU,
which is how their logic is exercised on machines without one.
"""

import os

import pytest
import torch

from scoreflow.likelihood import likelihood_bound, ode_log_likelihood
from scoreflow.nets import NCSNpp, ScoreModel
from scoreflow.oracles import GaussianMixture
from scoreflow.sde import VPSDE, SubVPSDE
from tests.unit.test_likelihood_ode import exact_nll

DEVICE = os.environ.get("SCOREFLOW_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off: the float32 comparisons below are about our code, not about TF32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def small_ddpmpp(**kw) -> NCSNpp:
    """A DDPM++-shaped net (attention at 8x8, FIR off) small enough for a test; perturbed so it is not ~0."""
    torch.manual_seed(0)
    net = NCSNpp(shape=(3, 16, 16), nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def inputs(n: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    label = torch.rand(n, generator=g) * 999
    return x.to(DEVICE), label.to(DEVICE)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_bf16_training_step_and_float64_likelihood():
    sde = VPSDE()
    net = NCSNpp(shape=(3, 16, 16), nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)).to(DEVICE)
    model = ScoreModel(net, sde).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 16, 16, device=DEVICE) * 2 - 1
    t = torch.rand(4, device=DEVICE) * 0.9 + 0.05
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss = (model(x, t).float() ** 2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        b = likelihood_bound(model, sde, x, num_t=16, generator=g)

    def score64(y, s):  # what ScoreLitModule does: the net in float32, the ODE state in float64
        return model(y.float(), s.float()).double()

    o = ode_log_likelihood(score64, sde, x, rtol=1e-3, atol=1e-3, generator=g, dtype=torch.float64)
    assert torch.isfinite(b.nll).all() and torch.isfinite(o.nll).all()


@pytest.mark.parametrize("fir", [False, True], ids=["ddpmpp", "fir"])
def test_device_matches_cpu_in_float64(fir):
    """The same weights and inputs in float64: the device's kernels agree with the CPU's to rounding."""
    net = small_ddpmpp(fir=fir).double()
    x, label = inputs()
    with torch.no_grad():
        want = net(x.cpu().double(), label.cpu().double())
        got = net.to(DEVICE)(x.double(), label.double()).cpu()
    assert rel(got, want) < 1e-10


def test_fused_attention_matches_plain_attention():
    """SDPA (flash / memory-efficient kernels) gives what softmax(q k^T / sqrt(C)) v gives."""
    net = small_ddpmpp().to(DEVICE)
    x, label = inputs()
    with torch.no_grad():
        fused = net(x, label)
    plain = net(x.clone().requires_grad_(True), label).detach()  # input grads on -> the unfused path
    assert rel(fused, plain) < 1e-5


def test_channels_last_changes_nothing():
    net = small_ddpmpp().to(DEVICE)
    x, label = inputs()
    with torch.no_grad():
        want = net(x, label)
        net = net.to(memory_format=torch.channels_last)
        got = net(x.contiguous(memory_format=torch.channels_last), label)
    assert rel(got, want) < 1e-5


def test_bf16_autocast_is_close_and_the_likelihood_path_stays_fp32():
    net = small_ddpmpp().to(DEVICE)
    x, label = inputs()
    with torch.no_grad():
        want = net(x, label)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            got = net(x, label)
            # float64 inputs are never cast by autocast: the float64 ODE is unaffected by a surrounding context
            got64 = net.double()(x.double(), label.double())
            net.float()
    assert got.dtype == torch.bfloat16 and got64.dtype == torch.float64
    assert rel(got.float(), want) < 3e-2
    assert rel(got64, want) < 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="compile checked on the GPU only (slow on CPU)")
def test_torch_compile_matches_eager():
    net = small_ddpmpp().to(DEVICE)
    x, label = inputs()
    with torch.no_grad():
        want = net(x, label)
        got = torch.compile(net)(x, label)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("sde_cls", [VPSDE, SubVPSDE], ids=["vp", "subvp"])
def test_ode_likelihood_on_device_matches_the_exact_density(sde_cls):
    """Gaussian-mixture data, exact score, float64 ODE on the device: -log p_eps(x) to solver tolerance."""
    sde = sde_cls()
    eps = 1e-5
    weights, means = torch.tensor([0.4, 0.6]), torch.tensor([[1.0, -0.5], [-1.0, 0.5]])
    params = [weights, means, torch.tensor([[0.1, 0.2], [0.3, 0.05]])]
    x = GaussianMixture(*params).sample(64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mix = GaussianMixture(*[p.to(DEVICE) for p in params])
    res = ode_log_likelihood(mix.score_fn(sde), sde, x, eps=eps, divergence="exact", dtype=torch.float64)
    assert res.nll.device.type == torch.device(DEVICE).type
    assert float((res.nll - exact_nll(mix, sde, x, res.z, eps)).abs().max()) / 2 < 2e-3
