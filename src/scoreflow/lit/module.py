"""``ScoreLitModule``: the only place where the maths meets Lightning.

training_step = dequantize -> scale -> sample (t, weight) -> per-example loss -> weighted mean, with
manual optimization so that a non-finite loss or gradient skips the step (counted and logged) and too
many in a row stop the run with a message naming the step. All randomness of a training step comes
from a generator seeded by ``(seed, rank, batch index)``, so a resumed run continues bit-exactly and
ranks draw different noise.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scoreflow.data.base import random_hflip
from scoreflow.dequantization import Dequantizer, to_model_space
from scoreflow.likelihood import likelihood_bound, nats_to_bpd, ode_log_likelihood
from scoreflow.likelihood.ode import FIXED_GRID_METHODS
from scoreflow.lit.datamodule import StreamPosition, batch_number
from scoreflow.lit.metrics import MeanSE
from scoreflow.lit.optim import (  # noqa: F401 (NonFiniteLossError: API)
    GuardedOptimization,
    NonFiniteLossError,
    OptimizerFactory,
)
from scoreflow.lit.per_image import (
    bound_bpd,
    bound_plan,
    mean_se_over_images,
    nonfinite_images,
    ode_bpd,
    protocol_of,
)
from scoreflow.lit.settings import EvalConfig, OptimConfig
from scoreflow.losses import dsm_loss, ism_loss
from scoreflow.nets import ScoreModel
from scoreflow.utils import ieee_float32
from scoreflow.weighting import TimeSampler

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRAIN_INPUTS = ("dequantized", "levels")
"""What the score model is trained on (``module.train_input``): ``dequantized``, ``(k + u) / K`` with the run's
dequantizer (the maximum-likelihood objective the bound and the ODE NLL evaluate); ``levels``, ``k / (K - 1)``
without noise, as ScoreFlow's JAX code trains (its evaluation dequantizes, as ours always does)."""


def step_seed(seed: int, rank: int, index: int, salt: int = 0) -> int:
    """A 63-bit seed that differs per run seed, rank, batch index and purpose."""
    return (seed * 1_000_003 + rank * 7_919 + index * 104_729 + salt * 15_485_863) % (2**63 - 1)


def seed_global_rngs(seed: int, device: torch.device) -> None:
    """Seed the global generators that a training step on ``device`` draws from (dropout) as
    ``torch.manual_seed(seed)`` would: the CPU's and, on CUDA, every GPU's. ``torch.manual_seed`` itself also queues
    a lazy seed for CUDA when CUDA is not initialised, and records the whole Python stack for it: on a CPU run
    inside Lightning's loop that was the costliest host call of the step (README "GPU speed")."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


class ScoreLitModule(StreamPosition, GuardedOptimization):
    """Training and evaluation of a score model.

    Args:
        score_model: network wrapped as ``score(x, t)`` (holds the SDE).
        time_sampler: the weighting (``original`` / ``likelihood`` / ``lw_is``) as a ``(t, weight)`` sampler.
        dequantizer: maps integer levels to ``(x in (0,1), log q)``; ``None`` for continuous data.
        num_levels: K for discrete data, ``None`` for continuous data.
        data_shape: one example's shape (for sampling).
        scale, shift: data enter the SDE as ``y = scale * x + shift`` (2, -1: "centered" [-1, 1]).
        loss: ``"dsm"`` (denoising) or ``"ism"`` (implicit/Hutchinson, Huang et al. 2021, Sec. 6).
        loss_reduce: ``"mean"`` (the reference's ``reduce_mean``) or ``"sum"`` over dimensions.
        optim: Adam settings, linear warmup steps and global-norm clip: an :class:`OptimConfig` or a mapping of
            its fields (docs/reference.md §7).
        optimizer: ``factory(params, lr=...)`` replacing the built-in Adam (``module.optimizer``: a Hydra
            ``_partial_`` object, e.g. ``torch.optim.AdamW``); the warm-up, decay, clip and guard stay.
        evaluation: settings of the periodic and final likelihood evaluation: an :class:`EvalConfig` or a mapping
            of its fields.
        hflip: random horizontal flips of training images.
        max_bad_steps: consecutive non-finite steps tolerated before the run stops.
        seed: base seed of the per-step generators.
        channels_last: run the network in channels_last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the training loss's calls of the score model (the NCSN++ family traces without
            graph breaks), at the training batch's static shape: ``True`` or a ``torch.compile`` mode
            (``reduce-overhead``: CUDA graphs; ``max-autotune``; ``max-autotune-no-cudagraphs``). Everything else
            that calls the network (the shape check, FLOP counting, likelihood evaluation in float32/float64 at
            other batch sizes, sampling, the EMA copy) runs it eagerly, so nothing is compiled twice and no
            automatic dynamic-shape recompilation slows the training graph.
    """

    def __init__(
        self,
        score_model: ScoreModel,
        time_sampler: TimeSampler,
        dequantizer: Dequantizer | None,
        *,
        num_levels: int | None,
        data_shape: tuple[int, ...] = (),
        scale: float = 2.0,
        shift: float = -1.0,
        loss: str = "dsm",
        loss_reduce: str = "mean",
        optim: OptimConfig | dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        evaluation: EvalConfig | dict[str, Any] | None = None,
        hflip: bool = False,
        train_input: str = "dequantized",
        max_bad_steps: int = 20,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool | str = False,
    ):
        super().__init__()
        if loss not in ("dsm", "ism"):
            raise ValueError(f"loss must be 'dsm' or 'ism', got {loss!r}")
        if loss == "ism" and compile:
            raise ValueError("loss='ism' cannot be compiled: torch.compile does not support the double backward of "
                             "its Hutchinson divergence; use compile=False")
        if (num_levels is None) != (dequantizer is None):
            raise ValueError(
                f"num_levels={num_levels} and dequantizer={type(dequantizer).__name__} do not fit: discrete data "
                "need a dequantizer, continuous data (num_levels=None) must use dequantization=none"
            )
        self._init_guard()
        self.score_model = score_model
        self.sde = score_model.sde
        self.time_sampler = time_sampler
        self.dequantizer = dequantizer
        self.num_levels = num_levels
        self.data_shape = tuple(data_shape)
        self.scale, self.shift = float(scale), float(shift)
        self.loss_name, self.loss_reduce = loss, loss_reduce
        self.optim_cfg = OptimConfig.from_mapping(optim)
        self.optimizer_factory = optimizer
        self.eval_cfg = EvalConfig.from_mapping(evaluation)
        self.hflip = hflip
        if train_input not in TRAIN_INPUTS:
            raise ValueError(f"train_input must be one of {', '.join(TRAIN_INPUTS)}, got {train_input!r}")
        if train_input == "levels" and num_levels is None:
            raise ValueError("train_input='levels' is for discrete data (num_levels); these data are continuous")
        self.train_input = train_input
        if channels_last:
            self.score_model.net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise ValueError(f"module.compile={compile!r}: use true/false or a torch.compile mode "
                             f"{list(COMPILE_MODES)}")
        self.compile_mode = compile
        self._compiled_score_fn = None  # made at the first training call (train_score_fn)
        self.max_bad_steps = max_bad_steps
        self.seed = seed
        self.batches_seen = 0  # training batches drawn so far (skipped ones included); checkpointed
        # the last validation's values and step, checkpointed: a run resumed after it (a stop right after the last
        # step's validation) reports them as the uninterrupted run does, from Lightning's callback_metrics
        self.last_val_metrics: dict[str, float] = {}
        self.last_validation_step: int | None = None
        self.val_bound, self.val_ode = MeanSE(), MeanSE()
        self._test_values: dict[str, list[Tensor]] = {}  # rows (image index, repeat, value); "nfe": per solve
        self._test_seen = 0  # test images of this rank so far
        self._last_ode_step, self._ode_now = 0, False  # the step of the last ODE validation: checkpointed
        self._val_seen = 0  # validation images of this rank so far in this validation run
        self.config_dict: dict[str, Any] | None = None  # the run's resolved config, saved in checkpoints
        self.config_choices: dict[str, str] = {}  # the Hydra options it was composed of (model=ddpmpp, ...)
        self.output_dir: str | None = None  # where per-example test values are written

    # ------------------------------------------------------------------ data -> SDE space
    @property
    def eps(self) -> float:
        return self.eval_cfg.eps or self.time_sampler.eps

    def to_model_space(self, k: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Integer levels (or continuous data) -> ``(y, log_q)``: dequantize and scale."""
        return to_model_space(k, self.dequantizer, self.num_levels, self.scale, self.shift, generator)

    def to_bpd(self, nll_nats: Tensor, log_q: Tensor, dim: int) -> Tensor:
        """Per-example bits/dim of the discrete data (or of the continuous density of the data ``x``, not of the
        model's ``y = scale x + shift``: ``- log2 scale`` per dimension, 0 at ``scale = 1``)."""
        bpd = nats_to_bpd(nll_nats + log_q, dim, num_levels=self.num_levels, scale=self.scale)
        return bpd if self.num_levels is not None or self.scale == 1 else bpd - math.log2(self.scale)

    def _generator(self, index: int, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(self.seed, self.global_rank, index, salt))
        return g

    # ------------------------------------------------------------------ training
    def prepare(self, k: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training images ``k`` -> ``(y, log_q)``: random flip, dequantization and scaling, all drawn from ``g``."""
        if self.hflip:
            k = random_hflip(k, g)
        if self.train_input == "levels":  # ScoreFlow's training input: k / (K - 1), no noise (evaluation dequantizes)
            y = self.scale * (k.float() / (self.num_levels - 1)) + self.shift
            log_q = torch.zeros(k.shape[0], device=k.device)
        else:
            y, log_q = self.to_model_space(k, g)
        if self.channels_last and y.ndim == 4:
            y = y.contiguous(memory_format=torch.channels_last)
        return y, log_q

    @property
    def train_score_fn(self):
        """What the training loss calls: the score model, compiled where ``compile`` asks for it (a compiled
        function, not a registered module: state-dict keys stay those of the plain network)."""
        if not self.compile_mode:
            return self.score_model
        if self._compiled_score_fn is None:
            mode = None if self.compile_mode is True else self.compile_mode
            self._compiled_score_fn = torch.compile(self.score_model.forward, mode=mode, dynamic=False)
        return self._compiled_score_fn

    def __getstate__(self) -> dict[str, Any]:
        # pickling (ddp_spawn) and deepcopy: the compiled function is bound to this module's score model and
        # cannot be pickled; a copy compiles its own at its first training call
        return {**super().__getstate__(), "_compiled_score_fn": None}

    def score_loss(self, y: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted score-matching loss of ``y`` (times, weights and noise drawn from ``g``) and extra logs."""
        t, w = self.time_sampler.sample(y.shape[0], generator=g, device=y.device, dtype=y.dtype)
        z = torch.randn(y.shape, generator=g, device=y.device, dtype=y.dtype)
        if self.loss_name == "dsm":
            per = dsm_loss(self.train_score_fn, self.sde, y, t, noise=z, form="eps", reduce=self.loss_reduce)
        else:
            v = torch.randint(0, 2, y.shape, generator=g, device=y.device).to(y.dtype) * 2 - 1
            per = ism_loss(self.train_score_fn, self.sde, y, t, noise=z, probe=v, form="eps",
                           reduce=self.loss_reduce)
        weighted = w * per
        loss = weighted.mean()
        # the variance over examples of the minimised per-example terms, on the objective's scale (an unnormalized
        # importance sampler's dropped Z/(T-eps) restored), so weightings compare: the paper's 98.48 -> 0.068
        terms = weighted.detach() * self.time_sampler.objective_scale
        return loss, {"train/loss_var": terms.var() if terms.numel() > 1 else per.new_zeros(())}

    def training_loss(self, k: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        return self.score_loss(self.prepare(k, g)[0], g)

    def on_train_start(self) -> None:
        super().on_train_start()  # the requested optimizer settings on a resumed run
        if self.compile_mode and self.trainer.is_global_zero:
            mode = "default" if self.compile_mode is True else self.compile_mode
            log.info("module.compile=%s: the first training step compiles the network (minutes for the paper's "
                     "networks on a GPU); the steps after it run the compiled graph", mode)
            if mode in ("reduce-overhead", "max-autotune") and self.device.type != "cuda":
                log.warning("module.compile=%s: CUDA graphs need a CUDA device; on %s torch skips them and the "
                            "compiled step runs without them (speed=gpu is for GPUs: trainer=gpu)", mode,
                            self.device.type)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        index = self.batches_seen
        self.batches_seen += 1
        seed_global_rngs(step_seed(self.seed, self.global_rank, index, 1), self.device)  # dropout
        loss, extra = self.training_loss(batch[0], self._generator(index, 0))
        if self.guarded_step(loss, index) is not None or self._skipped:  # a step ended, taken or skipped: its values
            for name, value in extra.items():
                self.log_step(name, value)

    # ------------------------------------------------------------------ likelihood evaluation
    def _score_fn(self):
        model = self.score_model

        def fn(x: Tensor, t: Tensor) -> Tensor:
            # Lightning runs validation/test under the trainer's autocast (bf16-mixed): the likelihood must not
            # see bf16 scores, so autocast is switched off here; TF32 too (cuDNN's default for fp32 convs on GPUs).
            with torch.autocast(x.device.type, enabled=False), ieee_float32():
                return model(x.float(), t.float()).to(x.dtype)

        return fn

    def bound_nll(self, y: Tensor, num_t: int, g: torch.Generator) -> Tensor:
        e = self.eval_cfg
        res = likelihood_bound(
            self._score_fn(),
            self.sde,
            y,
            eps=self.eps,
            num_t=num_t,
            importance_sampling=e.importance_sampling,
            truncation_correction=e.truncation_correction,
            estimator=e.bound_estimator,
            stratified=e.stratified,
            generator=g,
        )
        return res.nll

    def ode_nll(self, y: Tensor, g: torch.Generator) -> tuple[Tensor, int]:
        e = self.eval_cfg
        res = ode_log_likelihood(
            self._score_fn(),
            self.sde,
            y,
            eps=self.eps,
            rtol=e.rtol,
            atol=e.atol,
            method=e.method,
            steps=e.steps if e.method in FIXED_GRID_METHODS else None,
            grid_rho=e.grid_rho,
            divergence=e.divergence,
            generator=g,
            dtype=getattr(torch, e.ode_dtype),
        )
        return res.nll, res.nfe

    def on_validation_epoch_start(self) -> None:
        # decide once per validation run whether the (expensive) ODE likelihood is due
        every = self.eval_cfg.nll_every
        self._ode_now = (
            bool(every) and self.eval_cfg.nll_subset > 0 and not self.trainer.sanity_checking
            and (self.global_step >= self._last_ode_step + every)
        )
        self._val_seen = 0
        # every rank holds a value list, maybe empty (a rank without validation images or without ODE images), so
        # that every rank enters the metrics' synced compute with the same gathers
        empty = torch.empty(0, dtype=torch.float64, device=self.device)
        self.val_bound.update(empty)
        if self._ode_now:
            self.val_ode.update(empty)

    def _val_batch(self, batch_idx: int, n: int) -> tuple[int, int] | None:
        """``(number, first)`` of this rank's validation batch ``batch_idx``: the batch's number among the batches
        of one process and the split index of its first image, from the loader's batch sampler
        (:class:`~scoreflow.lit.datamodule.BatchShardSampler`); ``None`` for its padding batch. A loader given by
        hand: ``batch_idx`` and this rank's count of images so far."""
        loader = self.trainer.val_dataloaders
        number = batch_number(loader, batch_idx)
        batches = getattr(getattr(loader, "batch_sampler", None), "batches", None)
        if batches is None:  # a loader given by hand
            first, self._val_seen = self._val_seen, self._val_seen + n
            return number, first
        return None if number is None else (number, batches[batch_idx][0])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """The bound of every validation image and, when due, the ODE likelihood of the first ``nll_subset``. The
        batches are those of one process and the noise is a function of the batch's number among them, so the
        values are those of one process on any number of processes."""
        k = batch[0]
        where = self._val_batch(batch_idx, k.shape[0])
        if where is None:  # a padding batch: this rank holds no validation image
            return
        number, first = where
        g = torch.Generator(device=self.device)  # fixed per batch: the same noise at every validation
        g.manual_seed(step_seed(self.seed, 0, number, 2))  # as rank 0 of one process draws it
        y, log_q = self.to_model_space(k, g)
        D = y[0].numel()
        self.val_bound.update(self.to_bpd(self.bound_nll(y, self.eval_cfg.val_num_t, g), log_q, D))
        m = min(k.shape[0], self.eval_cfg.nll_subset - first)  # the first nll_subset images of the split
        if self._ode_now and m > 0:
            nll, _ = self.ode_nll(y[:m], g)
            self.val_ode.update(self.to_bpd(nll, log_q[:m], D))

    def on_validation_epoch_end(self) -> None:
        m, se = self.val_bound.compute()  # synced: every rank computes, with the values of every rank
        values = {"val/bpd_bound": m.float(), "val/bpd_bound_se": se.float()}
        if self._ode_now:
            self._last_ode_step = self.global_step
            m, se = self.val_ode.compute()
            values |= {"val/bpd_ode": m.float(), "val/bpd_ode_se": se.float()}
        self.log_dict(values, sync_dist=False)
        self.log_optimizer_step_axis()
        self.val_bound.reset()
        self.val_ode.reset()
        if not self.trainer.sanity_checking:
            self.last_validation_step = self.global_step  # the table of a test=false run names it
            self.last_val_metrics |= {k: float(v) for k, v in values.items()}

    def on_test_epoch_start(self) -> None:
        self._test_values, self._test_seen = {}, 0

    def _test_indices(self, n: int) -> list[int]:
        """Split indices of this rank's next ``n`` test images: the order of the loader's batch sampler
        (``indices`` of ``BatchShardSampler``; empty for a padding batch), else (a loader given by hand) images
        ``rank, rank + world, ...``."""
        order = getattr(getattr(self.trainer.test_dataloaders, "batch_sampler", None), "indices", None)
        start, self._test_seen = self._test_seen, self._test_seen + n
        if order is not None:
            return list(order[start : start + n])
        rank, world = self.global_rank, self.trainer.world_size
        return [rank + world * pos for pos in range(start, start + n)]

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Per-image test bits/dim through :mod:`scoreflow.lit.per_image`, the function of ``evaluate.py``: on
        one process, with the same batches, ``evaluate.py ckpt_path=<this run's checkpoint>`` gives these values."""
        k, e = batch[0], self.eval_cfg
        idx = self._test_indices(k.shape[0])
        if not idx:  # the padding batch of a rank without test images: it only joins the others' gather
            return
        seed = e.seed
        plan = bound_plan(self, self.trainer.test_dataloaders.dataset, seed) if e.test_bound else None
        for r in range(e.test_repeats):
            if e.test_bound:
                self._record("bpd_bound", idx, r, bound_bpd(self, k, idx, r, seed, plan=plan))
            if e.test_ode:
                v, nfe = ode_bpd(self, k, idx, r, seed)
                self._record("bpd_ode", idx, r, v)
                self._test_values.setdefault("nfe", []).append(torch.tensor([[float(nfe)]], dtype=torch.float64))

    def _record(self, key: str, indices: list[int], repeat: int, values: Tensor) -> None:
        rows = torch.stack([torch.tensor(indices, dtype=torch.float64),
                            torch.full((len(indices),), float(repeat), dtype=torch.float64),
                            values.detach().double().cpu()], dim=1)
        self._test_values.setdefault(key, []).append(rows)

    def on_test_epoch_end(self) -> None:
        """Mean ± standard error over images of each image's mean over its repeats (as ``evaluate.py``), from
        the values of every rank; rank 0 writes them to ``test_per_example.npz``, in image order, with
        :meth:`test_meta`."""
        values = self.per_example_test_values()
        out, arrays = {}, {}
        for q in ("bpd_bound", "bpd_ode"):
            if q not in values:
                continue
            index, table, computed = per_image_table(values[q])
            mean, se, _ = mean_se_over_images(table, computed)
            out |= {f"test/{q}": torch.tensor(mean).float(), f"test/{q}_se": torch.tensor(se).float()}
            if bad := nonfinite_images(table, computed):  # kept in: the mean is NaN/inf, and says why
                out[f"test/{q}_num_nonfinite"] = torch.tensor(float(bad))
                if self.global_rank == 0:
                    log.warning("test: %d of %d images have a non-finite %s (see test_per_example.npz): the mean "
                                "over images is not finite", bad, len(index), q)
            arrays |= {"index": index, q: table[:, 0] if table.shape[1] == 1 else table}
        if "nfe" in values:
            out["test/nfe"] = values["nfe"].mean().float()
        if "index" in arrays:  # how many images the means are over (debug=fast tests 16 of digits' 400)
            out["test/num_images"] = torch.tensor(float(len(arrays["index"])))
        self.log_dict(out, sync_dist=False)  # every rank holds every value: nothing left to reduce
        if self.output_dir and self.global_rank == 0 and arrays:
            arrays["meta"] = np.asarray(json.dumps(self.test_meta()))
            np.savez(Path(self.output_dir) / "test_per_example.npz", **arrays)
        self._test_values = {}

    def test_meta(self) -> dict[str, Any]:
        """What the test values were measured on, stored with them (``meta``, a JSON string, in
        ``test_per_example.npz``) so that runs are paired only like with like (``bench/compare_runs.py``):
        ``data`` (the run's data config without ``root``), ``split``, ``seed`` (the per-image seed) and
        ``protocol``: eps, dequantization, ODE and bound settings and repeats, the dict ``evaluate.py`` stores
        (:func:`~scoreflow.lit.per_image.protocol_of`; it was the text line of ``metrics.json``, which could not be
        compared with an ``evaluate.py`` run's). Without the run's config (a module built by hand) ``data`` is
        ``None``."""
        cfg = self.config_dict or {}
        cached = getattr(self, "_bound_plan_cache", None)  # (seed, images the plan was fitted on, plan)
        protocol = {**protocol_of(self, plan_images=cached[1] if cached else None),
                    "repeats": int(self.eval_cfg.test_repeats)}
        data = {k: v for k, v in (cfg.get("data") or {}).items() if k != "root"} or None
        return {"data": data, "split": "test", "seed": int(self.eval_cfg.seed), "protocol": protocol}

    def per_example_test_values(self) -> dict[str, Tensor]:
        """The test rows of all ranks (ranks may hold different counts, a rank none): ``{key: [M, C]}`` on the
        CPU. Every rank gathers the quantities the settings compute, whether it holds rows of them or not."""
        e, out = self.eval_cfg, {}
        expected = {"bpd_bound": 3} if e.test_bound else {}
        expected |= {"bpd_ode": 3, "nfe": 1} if e.test_ode else {}
        for key in [*expected, *(k for k in self._test_values if k not in expected)]:
            rows = self._test_values.get(key) or [torch.empty(0, expected[key], dtype=torch.float64)]
            local = torch.cat(rows).to(self.device, torch.float64)
            if self.trainer.world_size > 1:
                n = self.all_gather(torch.tensor([local.shape[0]], device=self.device)).reshape(-1)
                padded = torch.full((int(n.max()), local.shape[1]), math.nan, dtype=torch.float64, device=self.device)
                padded[: local.shape[0]] = local
                everyone = self.all_gather(padded).reshape(-1, local.shape[1])
                local = everyone[~torch.isnan(everyone).all(dim=1)]
            if local.shape[0]:  # the same on every rank: each holds every row now
                out[key] = local.cpu()
        return out

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scoreflow"] = {
            **self.stream_state(),
            **self.guard_state(),
            "last_ode_step": self._last_ode_step,
            "last_validation": {"step": self.last_validation_step, "metrics": dict(self.last_val_metrics)},
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
            "batch_size": self._per_rank_batch(),
            "config": self.config_dict,
            "choices": dict(self.config_choices),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("scoreflow", {})
        self.load_stream_state(state)
        self.load_guard_state(state, int(checkpoint.get("global_step", 0)))  # earlier releases: no streak
        self._last_ode_step = int(state.get("last_ode_step", 0))
        last = state.get("last_validation") or {}  # checkpoints of earlier releases: none
        self.last_validation_step = last.get("step")
        self.last_val_metrics = dict(last.get("metrics") or {})
        self._warn_if_world_changed(state)

    def _train_size(self) -> int | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        splits = getattr(dm, "splits", None)
        return len(splits["train"]) if isinstance(splits, dict) and "train" in splits else None

    def _warn_if_world_changed(self, state: dict[str, Any]) -> None:
        """A resume on another number of processes (a requeue onto another GPU count), said once, at the resume.

        Step ``g`` of ``W`` processes with ``B`` images each takes the images at positions ``[g W B, (g + 1) W B)``
        of the run's stream (each epoch's permutation, of which ``W`` processes use the first ``W (n // W)``;
        :class:`~scoreflow.lit.datamodule.ResumableSampler`). So with the same global batch ``W B`` and the same
        epoch length, every step takes the images the interrupted run's would have: the data order continues, and
        only the noise each process draws for its images (dequantization, times, flips) differs, which makes it the
        same run in distribution, not bit for bit. Otherwise the global batch changes or images of the epoch are
        repeated or skipped."""
        before, now = state.get("world_size"), self.trainer.world_size if self._trainer is not None else 1
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        per_before, per_now = state.get("batch_size"), self._per_rank_batch()
        if (before is None or int(before) == int(now)) and isinstance(per_before, int) and \
                isinstance(per_now, int) and per_before != per_now:  # was silent (resume audit)
            log.warning("resume: this checkpoint was trained with datamodule.batch_size=%d, this run has %d: the data "
                        "stream continues at the next image, in batches of the new size, so the run is not the "
                        "uninterrupted one (its steps, learning-rate schedule and noise differ). Resume with "
                        "datamodule.batch_size=%d for an exact continuation.", per_before, per_now, per_before)
            return
        if before is None or int(before) == int(now):
            return
        before, now = int(before), int(now)
        per_before, per_now, n = state.get("batch_size"), self._per_rank_batch(), self._train_size()
        sizes = isinstance(per_before, int) and isinstance(per_now, int)
        same_epoch = n is not None and before * (n // before) == now * (n // now)
        if sizes and before * per_before == now * per_now and same_epoch:
            log.warning("resume: this checkpoint was trained on %d process(es) x %d images, this run has %d x %d: the "
                        "same global batch of %d images, so every step takes the images the interrupted run's would "
                        "have; the noise each process draws for its images (dequantization, times, flips) differs, so "
                        "the run continues in distribution, not bit for bit. Resume on %d process(es) for an exact "
                        "continuation.", before, per_before, now, per_now, now * per_now, before)
            return
        batch = ""
        if sizes and before * per_before != now * per_now:
            per = f"={per_now}" if per_before == per_now else f" {per_before} -> {per_now}"
            batch = (f"; the global batch changes from {before * per_before} to {now * per_now} images "
                     f"(datamodule.batch_size{per} per process)")
        keep = (f", or keep the global batch of {before * per_before} images (datamodule.batch_size="
                f"{before * per_before // now})" if sizes and same_epoch and (before * per_before) % now == 0 else "")
        log.warning("resume: this checkpoint was trained on %d process(es), this run has %d%s, and the data order "
                    "does not continue the interrupted run's (images of the current epoch are repeated or skipped): "
                    "the result is not the uninterrupted run's. Resume on %d process(es) for an exact continuation%s.",
                    before, now, batch, before, keep)


def per_image_table(rows: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``(image index, repeat, value)`` -> image indices ``[N]`` (sorted), values ``[N, K]`` (NaN if absent)
    and which were computed ``[N, K]`` (a computed value may itself be NaN: a diverged solve)."""
    r = rows.numpy()
    index, where = np.unique(r[:, 0].astype(np.int64), return_inverse=True)
    table = np.full((index.size, int(r[:, 1].max()) + 1), np.nan)
    computed = np.zeros(table.shape, dtype=bool)
    table[where, r[:, 1].astype(np.int64)] = r[:, 2]
    computed[where, r[:, 1].astype(np.int64)] = True
    return index, table, computed
