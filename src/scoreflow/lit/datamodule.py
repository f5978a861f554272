"""DataModule over a data source's train/val/test splits with resumable, rank-sharded sampling.

The training sampler is an infinite stream whose order is a function of ``(seed, epoch, rank)`` only,
started at the number of batches the module has already drawn, so a resumed run sees exactly the
batches the uninterrupted run would have seen. Validation and test loaders deal the batches of one process out
to the ranks whole (:class:`BatchShardSampler`): every image is evaluated exactly once (Lightning's
DistributedSampler would repeat some), and since an adaptive ODE solver shares its steps across a batch and the
modules draw their evaluation noise per batch number, every value is the same on any number of processes.

``on_device=True`` keeps the training split on the training device instead (CIFAR-10's 49000 images are
150 MB of ``uint8``) and gathers each batch there (:class:`DeviceBatches`): the same batches in the same
order, without a DataLoader, its per-example Python calls, pinned copies or host-to-device transfers per step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from scoreflow.data.base import ArrayDataset
from scoreflow.lit.preemption import REQUEUE_SIGNALS, STOP_SIGNALS

log = logging.getLogger(__name__)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the workers ignore the signals that pre-emption acts on, which the main
    process handles (checkpoint at the end of the step, then stop; it shuts the workers down). SLURM, ``timeout``
    and Ctrl-C signal the whole process group: torch's workers would die on SIGTERM (its handler) and SIGUSR1, and
    the main process would then fail at its next batch with "DataLoader worker ... is killed by signal", before the
    step's checkpoint. A worker whose main process is killed still exits (torch's watchdog)."""
    for s in (*REQUEUE_SIGNALS, *STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)


class BatchSizeError(ValueError):
    """A training batch larger than one process's share of the training split (each batch would repeat images;
    ``datamodule.batch_size=100000`` on digits was killed for memory with no message). ``fix``: what to set."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


class StreamPosition:
    """A training module's place in the training stream, for a resume: ``batches_seen``, this process's training
    batches (which every per-batch seed is a function of), and :attr:`samples_seen`, the images all processes have
    taken together. The latter places the stream when a resume changes the per-process batch size or the number of
    processes: counting batches of the new size skipped or repeated images of the epoch (10 batches of 32, resumed
    at 64, started at image 640). Mixed into the modules; checkpoint keys ``batches_seen`` and ``samples_seen``."""

    batches_seen: int = 0
    _samples_base: tuple[int | None, int] = (0, 0)  # samples_seen when this segment started, and batches_seen then

    def _per_rank_batch(self) -> int | None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(dm, "batch_size", None)
        return int(size) if isinstance(size, int) else None

    @property
    def samples_seen(self) -> int | None:
        base, at = self._samples_base
        per, world = self._per_rank_batch(), self.trainer.world_size if self._trainer is not None else 1
        return None if base is None or per is None else base + (self.batches_seen - at) * per * world

    def stream_state(self) -> dict[str, int | None]:
        return {"batches_seen": self.batches_seen, "samples_seen": self.samples_seen}

    def load_stream_state(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
        seen = state.get("samples_seen")
        per, world = state.get("batch_size"), state.get("world_size")
        if seen is None and isinstance(per, int) and isinstance(world, int):  # checkpoints of earlier releases
            seen = self.batches_seen * per * world
        self._samples_base = (None if seen is None else int(seen), self.batches_seen)


class ResumableSampler(Sampler[int]):
    """Infinite shuffled indices for one rank, starting at position ``start`` (in samples of this rank)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def epochs(self) -> Iterator[Tensor]:
        """The stream in chunks: the rest of the starting epoch, then one whole epoch of this rank at a time."""
        per_rank = self.n // self.world_size
        if per_rank == 0:
            raise ValueError(f"{self.n} training examples cannot be split over {self.world_size} ranks")
        epoch, offset = divmod(self.start, per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[self.rank :: self.world_size][:per_rank]
            yield perm[offset:]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        for chunk in self.epochs():
            yield from chunk.tolist()


class DeviceBatches:
    """Infinite training batches ``(x[idx], y[idx])`` gathered on the device holding ``x`` and ``y``.

    ``idx`` runs through ``sampler`` (a :class:`ResumableSampler`) ``batch_size`` at a time, exactly as a
    ``DataLoader(batch_size=batch_size, sampler=sampler, drop_last=True)`` would, batches straddling epochs
    included; the indices of one epoch reach the device in one copy, so a step makes no host-to-device
    transfer and no host synchronisation.
    """

    def __init__(self, x: Tensor, y: Tensor, sampler: ResumableSampler, batch_size: int):
        if x.device != y.device:
            raise ValueError(f"images on {x.device} but labels on {y.device}")
        self.x, self.y, self.sampler, self.batch_size = x, y, sampler, int(batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device, b = self.x.device, self.batch_size
        pending = torch.empty(0, dtype=torch.long, device=device)
        for chunk in self.sampler.epochs():
            pending = torch.cat([pending, chunk.to(device, non_blocking=True)])
            n_full = len(pending) // b
            for i in range(n_full):
                idx = pending[i * b : (i + 1) * b]
                yield self.x[idx], self.y[idx]
            pending = pending[n_full * b :]


class BatchShardSampler(Sampler[list[int]]):
    """A batch sampler over ``range(n)``: the batches of one process (``batch_size`` consecutive images, the last
    one smaller), batch ``j`` to rank ``j mod world_size`` (as ``evaluate.py`` deals them).

    A rank left without a batch (fewer batches than ranks) gets one *padding* batch, ``[0]``, so that its
    evaluation loop runs and enters the collectives of the others; ``indices`` (this rank's real images, in the
    order of its batches) does not contain it, and the module skips a batch that has no indices left.
    ``numbers``: the number of each of this rank's batches among the batches of one process.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        every = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        self.numbers = list(range(rank, len(every), world_size))
        self.batches = every[rank::world_size]
        self.indices = [i for b in self.batches for i in b]
        self.padding = n > 0 and not self.batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter([[0]] if self.padding else self.batches)

    def __len__(self) -> int:
        return 1 if self.padding else len(self.batches)


def batch_number(loader, batch_idx: int) -> int | None:
    """The number, among the batches of one process, of this rank's batch ``batch_idx`` of ``loader`` (from its
    :class:`BatchShardSampler`; ``None`` for its padding batch); ``batch_idx`` for a loader without one."""
    sampler = getattr(loader, "batch_sampler", None)
    if getattr(sampler, "numbers", None) is None:
        return batch_idx
    return None if sampler.padding else sampler.numbers[batch_idx]


class ScoreDataModule(pl.LightningDataModule):
    """Wraps a data source (``load() -> {"train", "val", "test"}``).

    Args:
        source: a ``scoreflow.data`` source object.
        batch_size: per-rank training batch size.
        eval_batch_size: per-rank batch size for validation/test likelihoods.
        val_subset: number of validation images in the periodic bound evaluation (fixed, the first ones).
        test_subset: evaluate only the first N test images (``None``: every one of them).
        num_workers: DataLoader workers (0 is fastest for the in-memory datasets).
        seed: seed of the training order.
        on_device: keep the training split on the training device and gather batches there
            (:class:`DeviceBatches`; the same batches as the DataLoader; ``num_workers`` then serves only the
            validation and test loaders).
    """

    def __init__(
        self,
        source,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        val_subset: int | None = 256,
        test_subset: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        on_device: bool = False,
    ):
        super().__init__()
        self.source = source
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_subset, self.test_subset = val_subset, test_subset
        self.num_workers, self.seed = num_workers, seed
        self.on_device = bool(on_device)
        self.splits: dict[str, Dataset] | None = None
        self._device_split: tuple[Tensor, Tensor] | None = None  # the training split on the device, made once

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.source.load()

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ds: Dataset, sampler: Sampler, batch_size: int | None, *, train: bool = False) -> DataLoader:
        """Training: full batches only (one shape for the compiled step); evaluation (``sampler`` a batch sampler,
        ``batch_size=None``): every example, and workers kept between the periodic evaluations."""
        batching = {"batch_size": batch_size, "sampler": sampler, "drop_last": train} if train else \
            {"batch_sampler": sampler}
        return DataLoader(
            ds,
            **batching,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_stop_signals,
            persistent_workers=self.num_workers > 0 and not train,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        rank, world = self._rank_world()
        ds = self.splits["train"]
        if self.batch_size > len(ds) // world:
            most = len(ds) // world
            raise BatchSizeError(
                f"datamodule.batch_size={self.batch_size} images per process is more than one process's share of "
                f"the training split ({len(ds)} images over {world} process(es): {most} each); every batch would "
                "repeat images", fix=f"datamodule.batch_size={min(128, most) if most else 1} (at most {most})")
        start = 0
        module = self.trainer.lightning_module if self.trainer is not None else None
        if (seen := getattr(module, "samples_seen", None)) is not None:  # the images of every process so far
            start = seen // world
        elif hasattr(module, "batches_seen"):  # a module without StreamPosition, a checkpoint without the count
            start = module.batches_seen * self.batch_size
        sampler = ResumableSampler(len(ds), self.seed, rank, world, start)
        if self.on_device:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            return DeviceBatches(*self._train_split_on(device), sampler, self.batch_size)
        return self._loader(ds, sampler, self.batch_size, train=True)

    def _train_split_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The training split's images and labels as two tensors on ``device``, copied there once."""
        if self._device_split is None or self._device_split[0].device != device:
            ds = self.splits["train"]
            if type(ds) is not ArrayDataset or ds.hflip:
                what = type(ds).__name__ + (" with hflip" if isinstance(ds, ArrayDataset) else "")
                raise ValueError(
                    f"datamodule.on_device=true needs the training split as an in-memory ArrayDataset without "
                    f"per-access augmentation (scoreflow's sources, whose flips the module draws); got {what}. "
                    f"Set datamodule.on_device=false."
                )
            x, y = (ds.x, ds.y) if ds.index is None else (ds.x[ds.index], ds.y[ds.index])
            x, y = x.to(device), y.to(device)
            self._device_split = (x, y)
            log.info("datamodule.on_device: %d training examples (%.1f MB) on %s", len(x),
                     x.numel() * x.element_size() / 1e6, device)
        return self._device_split

    def _eval_split(self, name: str, subset: int | None) -> DataLoader:
        ds = self.splits[name]
        if subset is not None and subset < len(ds):
            ds = Subset(ds, range(subset))
        rank, world = self._rank_world()
        return self._loader(ds, BatchShardSampler(len(ds), self.eval_batch_size, rank, world), None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_split("val", self.val_subset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_split("test", self.test_subset)
