"""Training with a learnable dequantizer ``q_φ(u|k)`` (Song et al. 2021b, Sec. 5.2, Eq. 13; docs/reference.md §5).

The per-image objective, in nats, is the Theorem-3 bound of the dequantized image plus its log-density under
the flow,

    J_φ(k) = E_{u ~ q_φ(·|k)}[ L^DSM(y) + log q_φ(u|k) ],     y = scale · (k + u)/K + shift,

with importance-sampled time and the ε-correction (Song et al. 2021b, Theorem 3 and Sec. 4.3), so that
``J_φ(k)/(D ln 2)`` plus the offset of :func:`scoreflow.likelihood.nats_to_bpd` bounds the bits/dim of the discrete
image. Gradients reach φ through ``y`` (reparametrised sample of the flow) and through ``log q_φ``. Two modes of
:class:`DequantLitModule`:

* **after** (``freeze_score=True``, SF's recipe, ``train_dequant.py``): the score network is frozen (EMA weights,
  eval mode, ``requires_grad=False``) and only φ trains, on ``J_φ`` alone.
* **joint** (``freeze_score=False``, ``train.py dequantization=variational``): the score network trains with its
  usual weighted DSM loss on ``y ~ q_φ`` (``y`` detached: the DSM loss does not pull on φ) and φ with
  ``weight · J_φ``, evaluated with the score network's parameters detached (``J_φ`` does not pull on θ).

Evaluation is inherited unchanged: :meth:`ScoreLitModule.to_bpd` already reports ``E[−log p(y) + log q(u|k)]``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from scoreflow.dequantization import importance_weighted_nll
from scoreflow.likelihood import likelihood_bound
from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.settings import DequantConfig


@torch.no_grad()
def importance_weighted_bpd(
    module: ScoreLitModule, k: Tensor, num_samples: int, *, kind: str = "bound", num_t: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-image bits/dim of the ``num_samples``-sample importance-weighted estimate through ``module``'s own
    dequantizer, scaling and likelihood (``kind="bound"``: Theorem 3 with the module's evaluation settings and
    ``num_t`` times; ``kind="ode"``: probability-flow NLL). ``k``: levels ``[B, ...]``; returns ``[B]``."""
    if kind not in ("bound", "ode"):
        raise ValueError(f"kind must be 'bound' or 'ode', got {kind!r}")
    nlls, log_qs = [], []
    for _ in range(num_samples):
        y, log_q = module.to_model_space(k, generator)
        if kind == "bound":
            nll = module.bound_nll(y, num_t or module.eval_cfg.test_num_t, generator)
        else:
            nll = module.ode_nll(y, generator)[0]
        nlls.append(nll.detach().double())
        log_qs.append(log_q.detach().double())
    iw = importance_weighted_nll(torch.stack(nlls), torch.stack(log_qs))
    return module.to_bpd(iw, torch.zeros_like(iw), k[0].numel())


class DequantLitModule(ScoreLitModule):
    """A :class:`ScoreLitModule` whose dequantizer is trained on Eq. 13 (see the module docstring).

    Args:
        dequant: settings of ``J_φ``: a :class:`DequantConfig` or a mapping of its fields (``weight`` in joint
            mode, ``freeze_score``, ``num_t`` and ``num_eps_samples`` of the training estimate,
            ``importance_sampling``, ``truncation_correction``).
        *args, **kwargs: as for :class:`ScoreLitModule`; the dequantizer must have trainable parameters.
    """

    def __init__(self, *args: Any, dequant: DequantConfig | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dequant_cfg = DequantConfig.from_mapping(dequant)
        if self.train_input != "dequantized":
            raise ValueError(f"module.train_input={self.train_input} trains on noise-free levels, but "
                             "dequantization=variational learns its noise from the training input: use "
                             "module.train_input=dequantized")
        if self.dequantizer is None or not any(p.requires_grad for p in self.dequantizer.parameters()):
            raise ValueError(
                f"module.dequant trains the dequantizer, but dequantization={type(self.dequantizer).__name__} "
                "has no trainable parameters: use dequantization=variational or drop module.dequant"
            )
        self.freeze_score = self.dequant_cfg.freeze_score
        if self.freeze_score:
            self.score_model.requires_grad_(False)  # also keeps it out of the optimizer, the clip and the EMA
            self.score_model.eval()
            # Lightning's "Found N module(s) in eval mode at the start of training": these, on purpose
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

    def train(self, mode: bool = True) -> DequantLitModule:
        super().train(mode)
        if self.freeze_score:  # Lightning calls .train() at fit start: keep the frozen net's dropout off
            self.score_model.eval()
        return self

    # ------------------------------------------------------------------ the objective
    def _detached_score_fn(self):
        """``score(x, t)`` with θ detached: ``J_φ`` sends gradients to ``x`` (hence φ) only."""
        model = self.score_model
        params = {n: p.detach() for n, p in model.named_parameters()}

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return functional_call(model, params, (x.float(), t.float())).to(x.dtype)

        return fn

    def dequant_objective(self, y: Tensor, log_q: Tensor, g: torch.Generator | None) -> Tensor:
        """``J_φ`` per image ``[B]`` in nats: a one-draw estimate of ``L^DSM(y) + log q_φ(u|k)``."""
        d = self.dequant_cfg
        bound = likelihood_bound(
            self._detached_score_fn(), self.sde, y, eps=self.eps, num_t=d.num_t,
            importance_sampling=d.importance_sampling, truncation_correction=d.truncation_correction,
            num_eps_samples=d.num_eps_samples, generator=g,
        )
        return bound.nll + log_q

    def training_loss(self, k: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        D = k[0].numel()
        y, log_q = self.prepare(k, g)  # y keeps its graph to φ for J_φ
        if self.freeze_score:
            loss, extra = y.new_zeros(()), {}
        else:  # the usual weighted DSM loss, on a detached y: it does not pull on φ
            loss, extra = self.score_loss(y.detach(), g)
        obj = self.dequant_objective(y, log_q, g)
        weight = 1.0 if self.freeze_score else self.dequant_cfg.weight
        loss = loss + weight * obj.mean() / D  # J_φ in nats per dimension: a learning rate independent of D
        extra = {
            **extra,
            "train/dequant_bpd": self.to_bpd(obj.detach(), torch.zeros_like(log_q), D).mean(),
            "train/dequant_log_q_per_dim": log_q.detach().mean() / D,
        }
        return loss, extra
