"""The Throughput callback: FLOPs per image against independent counts, no trace left by the counting, images/s
with validation and checkpoint writes off the clock, the steady-state summary and the table row."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from scoreflow.lit.throughput import Throughput, peak_flops, training_flops_per_image
from scoreflow.nets import ScoreModel
from scoreflow.nets.unet import UNet
from scoreflow.sde import SubVPSDE
from scoreflow.tasks.common import train_speed


class TinyScore(nn.Module):
    """``Linear(4, 8) -> dropout -> tanh -> Linear(8, 4)`` with ``t`` added elementwise (no counted FLOPs)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 4)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.drop(self.fc1(x))))) + t[:, None]


def test_flops_per_image_is_the_hand_count_of_forward_and_weight_backward():
    # forward 2*4*8 + 2*8*4 = 128; backward: fc2 weight grad 64 and input grad 64, fc1 weight grad 64 (the input
    # x needs no gradient, as in training) = 192
    assert training_flops_per_image(TinyScore(), (4,), torch.device("cpu")) == 128 + 192


def test_flops_per_image_of_the_unet_is_a_batch_of_two_over_two():
    sde = SubVPSDE()
    model = ScoreModel(UNet(shape=(1, 8, 8), ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), sde)
    with FlopCounterMode(display=False) as counter:  # the independent count: .backward() on a batch of two
        out = model(torch.randn(2, 1, 8, 8), torch.rand(2))
        out.square().sum().backward()
    model.zero_grad(set_to_none=True)
    two = counter.get_total_flops()
    assert two > 0 and training_flops_per_image(model, (1, 8, 8), torch.device("cpu")) * 2 == two


def test_flop_counting_leaves_no_trace():
    net = TinyScore().train()
    net.fc1.weight.grad = None
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    training_flops_per_image(net, (4,), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn
    assert all(p.grad is None for p in net.parameters())
    assert all(m.training for m in net.modules())  # train mode restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics untouched
    # the test can fail: the same forward + backward in train mode draws dropout noise and updates the statistics
    net(torch.randn(2, 4), torch.rand(2)).sum().backward()
    assert not torch.equal(torch.get_rng_state(), rng) and net.fc1.weight.grad is not None
    assert not torch.equal(before["norm.running_mean"], net.state_dict()["norm.running_mean"])


def test_a_compiled_network_is_counted_eagerly():
    from torch._dynamo.utils import counters

    net = TinyScore()
    net.compile()  # in place (a library user may compile the network itself; ScoreLitModule compiles only its loss)
    counters.clear()
    assert training_flops_per_image(net, (4,), torch.device("cpu")) == 320
    assert not counters["frames"]  # nothing compiled for the batch of one (no recompilation with dynamic shapes)


def test_peak_flops():
    assert peak_flops(torch.device("cpu"), torch.float32) is None


def test_h200_peak_is_dense(monkeypatch):
    # Lightning 2.6.6 does not know "NVIDIA H200" and lists its with-sparsity figures: ours are the dense ones
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == 989.4e12
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert peak_flops(torch.device("cuda"), torch.float32) == 494.7e12  # cuDNN convolutions run in TF32
    for name, bf16 in [("NVIDIA H100", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 NVL", 835.5e12),
                       ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA H100 PCIe", 756e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(torch.device("cuda"), torch.bfloat16) == bf16, name


# ----------------------------------------------------------------------------- a tiny training run
class Sleepy(pl.LightningModule):
    """``train_s`` per training step, ``val_s`` per validation, ``save_s`` per checkpoint (fixed, so images/s
    is known in advance whatever the machine's load: a sleep only lasts longer)."""

    def __init__(self, train_s: float = 0.03, val_s: float = 0.0, save_s: float = 0.0):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.train_s, self.val_s, self.save_s = train_s, val_s, save_s

    def training_step(self, batch, batch_idx):
        time.sleep(self.train_s)
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_s)

    def on_save_checkpoint(self, checkpoint):  # runs after the callbacks' on_save_checkpoint
        time.sleep(self.save_s)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


class Unpaused(Throughput):
    """The clock as it would be without pausing."""

    def on_validation_start(self, trainer, pl_module):
        pass

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        pass


BATCH = 8


def fit(tmp_path, callback: Throughput, module: pl.LightningModule, max_steps: int, val_every: int | None = None,
        checkpoint_every: int | None = None, ckpt_path: str | None = None) -> Recorder:
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=BATCH)
    callbacks: list = [callback]
    if checkpoint_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=checkpoint_every))
    rec = Recorder()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=rec, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(checkpoint_every), default_root_dir=tmp_path,
        val_check_interval=val_every or 1000, check_val_every_n_epoch=None, limit_val_batches=1,
        num_sanity_val_steps=1, log_every_n_steps=5,
    )
    trainer.fit(module, data, data if val_every else None, ckpt_path=ckpt_path)
    rec.callback_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return rec


def test_validation_and_checkpoint_writes_are_off_the_clock(tmp_path):
    ideal = BATCH / 0.03  # img/s if only the training steps' sleep counted
    slow = dict(train_s=0.03, val_s=0.2, save_s=0.2)
    cb = Throughput(warmup_steps=5)
    rec = fit(tmp_path / "a", cb, Sleepy(**slow), max_steps=20, val_every=5, checkpoint_every=5)
    blind = Unpaused(warmup_steps=5)
    fit(tmp_path / "b", blind, Sleepy(**slow), max_steps=20, val_every=5, checkpoint_every=5)
    rate, blind_rate = cb.summary()["train/img_per_s"], blind.summary()["train/img_per_s"]
    # 5 steps of 0.15 s + 0.4 s of validation and checkpoint per window: a clock that did not pause reads < 40 %
    assert blind_rate < 0.4 * ideal, (blind_rate, ideal)
    assert 0.7 * ideal < rate <= ideal, (rate, ideal)
    summary = cb.summary()
    assert summary["train/throughput_steps"] == 15 and summary["train/throughput_steady"] == 1
    assert "train/tflops" not in summary and "train/mfu" not in summary  # no score_model: FLOPs unknown
    assert rec.callback_metrics["train/img_per_s"] == pytest.approx(rate)
    windows = [(s, m["train/img_per_s"]) for s, m in rec.rows if "train/img_per_s" in m]
    assert [s for s, _ in windows] == [4, 9, 14, 19]  # Lightning's logging step of steps 5, 10, 15, 20
    assert all(0.7 * ideal < r <= ideal for _, r in windows[1:]), windows


class CountsSyncs(Throughput):
    syncs = 0

    def _sync(self, trainer):
        CountsSyncs.syncs += 1


def test_the_device_is_synchronized_per_window_not_per_step(tmp_path):
    CountsSyncs.syncs = 0
    fit(tmp_path, CountsSyncs(warmup_steps=7), Sleepy(train_s=0.0), max_steps=20)
    # the first batch, the ends of the windows at steps 5, 10, 15, 20 and of the warm-up (step 7), the end of training
    assert CountsSyncs.syncs == 1 + 4 + 1 + 1


def test_a_resumed_run_measures_its_own_warmup(tmp_path):
    fit(tmp_path, Throughput(), Sleepy(train_s=0.0), max_steps=6, checkpoint_every=6)
    cb = Throughput(warmup_steps=3)
    fit(tmp_path, cb, Sleepy(train_s=0.0), max_steps=14, ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"))
    assert cb.summary()["train/throughput_steps"] == 14 - 9  # warm-up: steps 7-9 of the resumed run


def test_a_run_shorter_than_the_warmup_averages_after_its_first_window(tmp_path):
    cb = Throughput(warmup_steps=20)
    fit(tmp_path, cb, Sleepy(train_s=0.0), max_steps=12)
    summary = cb.summary()
    assert summary["train/throughput_steps"] == 7 and summary["train/throughput_steady"] == 0
    assert summary["train/img_per_s"] > 0


class ScoreLike(pl.LightningModule):
    """A score module in miniature whose steps draw from the global RNG (dropout, times) without reseeding, unlike
    ``ScoreLitModule``, which reseeds it every step: here any random number drawn at fit start changes the weights."""

    def __init__(self):
        super().__init__()
        self.score_model, self.data_shape = TinyScore(), (4,)

    def training_step(self, batch, batch_idx):
        return self.score_model(batch[0], torch.rand(batch[0].shape[0])).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DrawsAtFitStart(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        torch.rand(1)


def test_weights_are_bit_identical_with_and_without_the_callback(tmp_path):
    def weights(callbacks: list) -> dict[str, torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        module = ScoreLike()
        data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=BATCH)
        trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, callbacks=callbacks,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             default_root_dir=tmp_path)
        trainer.fit(module, data)
        return module.state_dict()

    cb = Throughput(every_n_steps=2, warmup_steps=2)
    plain, timed = weights([]), weights([cb])
    assert cb.flops_per_image == 320 and cb.summary()["train/tflops"] > 0  # the FLOPs were counted
    assert all(torch.equal(plain[k], timed[k]) for k in plain)
    drawn = weights([DrawsAtFitStart()])  # the comparison can fail: one random number at fit start shows
    assert not all(torch.equal(plain[k], drawn[k]) for k in plain)


def test_train_speed_row():
    assert train_speed({"train/steps": 4.0}) is None
    row = train_speed({"train/img_per_s": 1234.4, "train/throughput_steps": 480.0, "train/throughput_steady": 1.0,
                       "train/tflops": 12.34, "train/mfu": 0.1412})
    assert row == "1234 img/s (steady state, 480 steps), 12.3 TFLOP/s, 14.1 % MFU"
    row = train_speed({"train/img_per_s": 841.0, "train/throughput_steps": 15.0, "train/throughput_steady": 0.0})
    assert row == "841 img/s (15 steps, not steady state: run shorter than the warm-up)"
