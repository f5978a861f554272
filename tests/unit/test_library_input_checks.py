"""Input checks of the plain-PyTorch library API (README "The library in 20 lines"): a score of the wrong shape, bad
counts, out-of-range levels and mismatched dtypes fail at the call with a one-line error, not with wrong numbers."""

import re
import sys

import pytest
import torch

from scoreflow.dequantization import TruncatedNormalDequantizer, UniformDequantizer, VariationalDequantizer
from scoreflow.likelihood import (
    bpd_offset,
    bpd_to_nats,
    fit_bound_plan,
    likelihood_bound,
    nats_per_dim,
    nats_to_bpd,
    ode_log_likelihood,
)
from scoreflow.losses import dsm_loss, ism_loss
from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import (
    decode,
    encode,
    guided_score,
    inpaint,
    ode_sample,
    pc_sample,
    solve_probability_flow,
    tweedie_denoise,
)
from scoreflow.sde import VESDE, VPSDE
from scoreflow.utils import call_score, check_score_shape, shape_checked

SDE = VPSDE()
MIX = GaussianMixture(torch.ones(2), torch.tensor([[1.0, 1.0], [-1.0, -0.5]]), torch.full((2, 2), 0.05))
X = MIX.sample(8, generator=torch.Generator().manual_seed(0))  # [8, 2] float64
T = torch.full((8,), 0.5, dtype=torch.float64)
EXACT = MIX.score_fn(SDE)


def narrow(x, t):
    """The audit's bug: one column of the score, ``[B, 1]`` for ``x [B, 2]``; broadcasts through everything."""
    return EXACT(x, t)[:, :1]


def one_row(x, t):
    """``[1, D]``: the score of the first example only."""
    return EXACT(x, t)[:1]


def shape_error(out, x):
    return re.escape(f"score_fn returned shape {out} for x of shape {x}: it must return a tensor shaped like x")


# every public entry point that calls a score function: each must reject both wrong shapes
CALLS = {
    "dsm_loss": lambda s: dsm_loss(s, SDE, X, T),
    "dsm_loss_score_form": lambda s: dsm_loss(s, SDE, X, T, form="score", reduce="mean"),
    "ism_loss": lambda s: ism_loss(s, SDE, X, T),
    "ode_log_likelihood": lambda s: ode_log_likelihood(s, SDE, X, divergence="exact"),
    "ode_log_likelihood_rk4": lambda s: ode_log_likelihood(s, SDE, X, method="rk4", steps=4),
    "ode_log_likelihood_rk4_shared": lambda s: ode_log_likelihood(s, SDE, X, method="rk4_shared", steps=4),
    "ode_log_likelihood_exp_pc3": lambda s: ode_log_likelihood(s, SDE, X, method="exp_pc3", steps=4),
    "ode_log_likelihood_truncation": lambda s: ode_log_likelihood(s, SDE, X, truncation_correction=True),
    "likelihood_bound": lambda s: likelihood_bound(s, SDE, X, num_t=4),
    "likelihood_bound_truncation": lambda s: likelihood_bound(s, SDE, X, num_t=4, truncation_correction=True),
    "fit_bound_plan": lambda s: fit_bound_plan(s, SDE, X, num_bins=2, draws=2),
    "pc_sample": lambda s: pc_sample(s, SDE, (8, 2), steps=3, dtype=torch.float64),
    "pc_sample_lambda_family": lambda s: pc_sample(s, SDE, (8, 2), predictor="lambda_family", lam=0.5,
                                                   corrector="none", steps=3, dtype=torch.float64),
    "pc_sample_corrector_only": lambda s: pc_sample(s, VESDE(), (8, 2), predictor="none", corrector="ald", steps=3,
                                                    dtype=torch.float64),
    "pc_sample_denoise_only": lambda s: pc_sample(s, SDE, (8, 2), predictor="none", corrector="none", steps=3,
                                                  dtype=torch.float64),
    "ode_sample": lambda s: ode_sample(s, SDE, (8, 2), dtype=torch.float64),
    "ode_sample_rk4": lambda s: ode_sample(s, SDE, (8, 2), method="rk4", steps=3, dtype=torch.float64),
    "solve_probability_flow": lambda s: solve_probability_flow(s, SDE, X, 1e-3, 1.0),
    "encode": lambda s: encode(s, SDE, X),
    "decode": lambda s: decode(s, SDE, X),
    "tweedie_denoise": lambda s: tweedie_denoise(s, SDE, X, T),
    "inpaint": lambda s: inpaint(s, SDE, X, torch.tensor([[1.0, 0.0]]), steps=3),
    "guided_score": lambda s: pc_sample(guided_score(s, lambda x, t: -(x**2).sum(1)), SDE, (8, 2), steps=3,
                                        dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("wrong", [narrow, one_row], ids=["[B,1]", "[1,D]"])
def test_a_score_of_the_wrong_shape_raises(name, wrong):
    # the bound calls the score on [B * num_t, D] rows (B * draws * bins for the plan): any batch size n
    out = r"\[(\d+), 1\]" if wrong is narrow else r"\[1, 2\]"
    pattern = rf"^score_fn returned shape {out} for x of shape \[(\d+), 2\]: it must return a tensor shaped like x$"
    with pytest.raises(ValueError, match=pattern) as info:
        CALLS[name](wrong)
    if wrong is narrow:
        m = re.match(pattern, str(info.value))
        assert m.group(1) == m.group(2)


@pytest.mark.parametrize("name", list(CALLS))
def test_a_score_shaped_like_x_passes(name):
    CALLS[name](EXACT)


def test_the_shape_is_checked_once_per_solve_and_adds_no_evaluation():
    """The ODE's right-hand side checks its first evaluation only, and the check costs no extra score call."""
    calls = []

    def counted(x, t):
        calls.append(x.shape)
        return EXACT(x, t)

    res = ode_log_likelihood(counted, SDE, X, method="rk4", steps=5)
    assert len(calls) == res.nfe == 20
    late = {"n": 0}

    def wrong_later(x, t):  # right at the first call, wrong afterwards: only the first call is checked
        late["n"] += 1
        return EXACT(x, t) if late["n"] == 1 else EXACT(x, t)[:, :1]

    checked = shape_checked(wrong_later)
    assert checked(X, T).shape == (8, 2) and checked(X, T).shape == (8, 1)
    with pytest.raises(ValueError, match="shaped like x"):  # a fresh wrapper checks its own first call
        shape_checked(wrong_later)(X, T)


def test_check_score_shape_names_both_shapes_and_rejects_non_tensors():
    with pytest.raises(ValueError, match=shape_error("[3, 4]", "[3, 1, 2, 2]")):
        check_score_shape(torch.zeros(3, 4), torch.zeros(3, 1, 2, 2))
    with pytest.raises(TypeError, match="score_fn must return a tensor shaped like x, got tuple"):
        check_score_shape((torch.zeros(3, 4),), torch.zeros(3, 4))
    x = torch.zeros(3, 4)
    assert check_score_shape(x, x) is x


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_a_dtype_mismatch_inside_the_network_is_named_at_the_call():
    """README snippet with a float32 network and no dtype=: float64 oracle data reach a float32 layer."""
    net = torch.nn.Linear(2, 2)  # float32
    with pytest.raises(RuntimeError) as info:
        dsm_loss(lambda x, t: net(x), SDE, X, T.float())
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "score_fn was called with x [8, 2] float64 and t [8] float32 on cpu" in notes
    assert "GaussianMixture.sample defaults to float64" in notes
    with pytest.raises(RuntimeError) as info:  # nested checks (pc_sample's wrapper, then Tweedie) note it once
        pc_sample(lambda x, t: net(x), SDE, (8, 2), predictor="none", corrector="none", steps=1, dtype=torch.float64)
    assert len(info.value.__notes__) == 1
    with pytest.raises(ZeroDivisionError) as info:  # other errors: the call is named, without the dtype hint
        call_score(lambda x, t: 1 / 0, X, T)
    assert info.value.__notes__ == ["score_fn was called with x [8, 2] float64 and t [8] float64 on cpu"]


# ----------------------------------------------------------------------------- counts and units
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_t=0), "num_t must be >= 1 (time samples per example), got 0"),
        (dict(num_t=-4), "num_t must be >= 1 (time samples per example), got -4"),
        (dict(num_t=4, chunk_size=0), "chunk_size must be >= 1, got 0"),
        (dict(num_t=4, truncation_correction=True, num_eps_samples=0),
         "num_eps_samples must be >= 1 with truncation_correction=True, got 0"),
    ],
)
def test_bound_counts_are_validated_up_front(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        likelihood_bound(EXACT, SDE, X, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_bins=0), "num_bins must be >= 1, got 0"),
        (dict(chunk_size=0), "chunk_size must be >= 1, got 0"),
        (dict(floor=1.5), "floor must lie in [0, 1], got 1.5"),
    ],
)
def test_bound_plan_counts_are_validated_up_front(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_bound_plan(EXACT, SDE, X, **kwargs)


def test_units_reject_impossible_dimensions_levels_and_scales():
    nll = torch.tensor([1.0, 2.0])
    for call in (lambda: nats_to_bpd(nll, 0), lambda: bpd_to_nats(nll, 0), lambda: nats_per_dim(nll, 0),
                 lambda: nats_to_bpd(nll, -3, num_levels=None)):
        with pytest.raises(ValueError, match=r"dim must be >= 1 \(data dimensions D per example\), got -?\d"):
            call()
    for levels in (0, 1, -256):
        with pytest.raises(ValueError, match=rf"num_levels must be >= 2 .* got {levels}"):
            nats_to_bpd(nll, 4, num_levels=levels)
    for scale in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match=r"scale must be > 0 \(the a of y = a x \+ b\), got"):
            nats_to_bpd(nll, 4, num_levels=256, scale=scale)
    assert bpd_offset(2, 1.0) == 1.0 and nats_to_bpd(0.0, 1, num_levels=None, scale=0.0) == 0.0  # scale unused


# ----------------------------------------------------------------------------- dequantization levels
def _small_flow(shape, K):
    torch.manual_seed(0)
    return VariationalDequantizer.from_preset("small", shape, num_levels=K)


DEQUANTIZERS = {
    "uniform": lambda shape, K: UniformDequantizer(),
    "truncated": lambda shape, K: TruncatedNormalDequantizer(num_levels=K),
    "variational": _small_flow,
}


@pytest.mark.parametrize("name", list(DEQUANTIZERS))
@pytest.mark.parametrize("fill, lo, hi", [(30, 30, 30), (2, -3, 5), (2, 0, 17)])
def test_levels_outside_the_range_raise(name, fill, lo, hi):
    """The audit's ``UniformDequantizer()(torch.full((4, 1, 8, 8), 30), 17)`` gave x up to 1.82, k = -3 gave x < 0."""
    k = torch.full((4, 1, 8, 8), fill)
    k[0, 0, 0, 0], k[3, 0, 7, 7] = lo, hi
    deq = DEQUANTIZERS[name]((1, 8, 8), 17)
    msg = rf"levels k must lie in \[0, num_levels - 1\] = \[0, 16\], got min {lo}, max {hi} \(num_levels=17\)"
    with pytest.raises(ValueError, match=msg):
        deq(k, 17)


@pytest.mark.parametrize("name", list(DEQUANTIZERS))
def test_levels_in_range_give_x_in_the_unit_interval(name):
    k = torch.randint(0, 17, (4, 1, 8, 8))
    k[0, 0, 0, :2] = torch.tensor([0, 16])
    with torch.no_grad():
        x, _ = DEQUANTIZERS[name]((1, 8, 8), 17)(k, 17)
    assert 0 < x.min() and x.max() < 1


def test_float_and_uint8_levels():
    deq = UniformDequantizer()
    with pytest.raises(ValueError, match="got min 0, max 16.5"):
        deq(torch.tensor([[0.0, 16.5]]), 17)
    with pytest.raises(ValueError, match="got min nan"):
        deq(torch.tensor([[0.0, float("nan")]]), 17)
    with pytest.raises(ValueError, match="got min 0, max 200"):
        deq(torch.tensor([[0, 200]], dtype=torch.uint8), 17)
    x, _ = deq(torch.tensor([[0, 255]], dtype=torch.uint8), 256)  # cannot be out of range: not scanned
    assert 0 < x.min() and x.max() < 1
    with pytest.raises(ValueError, match="num_levels must be >= 2, got 1"):
        deq(torch.zeros(2, 3, dtype=torch.long), 1)


def test_dequantizer_dtypes_follow_the_default_dtype():
    k = torch.randint(0, 4, (2, 3))
    assert UniformDequantizer()(k, 4)[0].dtype == torch.get_default_dtype() == torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert UniformDequantizer()(k, 4)[0].dtype == torch.float64
        assert TruncatedNormalDequantizer(num_levels=4)(k, 4)[0].dtype == torch.float64
    finally:
        torch.set_default_dtype(before)
    assert UniformDequantizer(torch.float64)(k, 4)[0].dtype == torch.float64
