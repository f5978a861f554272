"""Continuous 2-D toy densities with seeded sampling; the mixtures expose their exact density and score.

All live roughly in ``[-3, 3]^2`` with unit-order spread, so the VP prior ``N(0, I)`` is a sensible fit.
``checkerboard``, ``8gaussians`` and ``gmm`` have exact ``log_prob``; the two mixtures also give
``.oracle`` (a :class:`scoreflow.oracles.GaussianMixture`) with exact scores of every diffused marginal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from scoreflow.data.base import ArrayDataset, DataSource, as_shape, check_num_levels, check_shape
from scoreflow.oracles import GaussianMixture

Sampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


def eight_gaussians() -> GaussianMixture:
    """Eight equal components of std 0.2 at radius 2, angles ``k pi / 4``."""
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    means = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.2**2))


def gaussian_mixture() -> GaussianMixture:
    """Three anisotropic components with unequal weights: a small, non-trivial exact density."""
    weights = torch.tensor([0.45, 0.35, 0.2])
    means = torch.tensor([[-1.5, -1.0], [1.5, -0.5], [0.0, 1.5]])
    variances = torch.tensor([[0.25, 0.09], [0.09, 0.36], [0.16, 0.16]])
    return GaussianMixture(weights, means, variances)


def _mixture_sampler(gm: GaussianMixture) -> Sampler:
    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        k = torch.multinomial(gm.log_w.exp(), n, replacement=True, generator=g)
        eps = torch.randn(n, gm.dim, generator=g, dtype=torch.float64)
        return gm.means[k] + gm.variances[k].sqrt() * eps, k

    return sample


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    # uniform on the 8 unit squares of [-2, 2]^2 whose integer corner (i, j) has i + j even
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    row = torch.randint(0, 2, (n,), generator=g).double() * 2  # one of two rows of the same parity
    x2 = torch.rand(n, generator=g, dtype=torch.float64) + row - 2 + (x1.floor() % 2)
    return torch.stack([x1, x2], dim=1), torch.full((n,), -1)


def checkerboard_log_prob(x: Tensor) -> Tensor:
    """Exact ``log p`` of the checkerboard: ``-log 8`` on its squares, ``-inf`` elsewhere."""
    inside = (x.abs() <= 2).all(dim=1) & ((x.floor().sum(dim=1) % 2) == 0)
    return torch.where(inside, -math.log(8.0), -math.inf).to(x.dtype)


def _swiss_roll(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1) / 5
    return x + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64), torch.full((n,), -1)


def _moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, 2, (n,), generator=g)
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    x = torch.where(y[:, None] == 0, upper, lower) + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return 1.5 * (x - torch.tensor([0.5, 0.25], dtype=torch.float64)), y


TOY_NAMES = ("checkerboard", "swiss_roll", "moons", "8gaussians", "gmm")


class Toy2D(DataSource):
    """``n`` / ``n_val`` / ``n_test`` seeded samples of a 2-D density; items ``(float32 [2], y)``.

    ``y`` is the mixture component (``8gaussians``, ``gmm``), the moon (``moons``) or ``-1``.
    The three splits use independent seeds spawned from ``seed`` (``numpy.random.SeedSequence``), so
    changing one split's size leaves the others unchanged.

    Args:
        name: one of ``checkerboard``, ``swiss_roll``, ``moons``, ``8gaussians``, ``gmm``.
        n, n_val, n_test: split sizes.
        seed: data seed.
        shape: must be ``[2]``.
        num_levels: must be ``None`` (continuous data).
    """

    def __init__(
        self,
        name: str = "gmm",
        n: int = 10000,
        n_val: int = 1000,
        n_test: int = 5000,
        seed: int = 0,
        shape: Sequence[int] = (2,),
        num_levels: int | None = None,
    ):
        super().__init__()
        if name not in TOY_NAMES:
            raise ValueError(f"toy2d: unknown name {name!r}; choose one of {TOY_NAMES}")
        self.name = name
        self.shape = as_shape(shape)
        check_shape(f"toy2d/{name}", self.shape, (2,))
        self.num_levels = check_num_levels(f"toy2d/{name}", num_levels, None)
        self.sizes = {"train": int(n), "val": int(n_val), "test": int(n_test)}
        self.seed = int(seed)
        self.oracle: GaussianMixture | None = {"8gaussians": eight_gaussians, "gmm": gaussian_mixture}.get(
            name, lambda: None
        )()
        self.num_classes = {"moons": 2, "8gaussians": 8, "gmm": 3}.get(name, 0)
        self._sampler: Sampler = {
            "checkerboard": _checkerboard,
            "swiss_roll": _swiss_roll,
            "moons": _moons,
        }.get(name) or _mixture_sampler(self.oracle)

    @property
    def has_log_prob(self) -> bool:
        return self.oracle is not None or self.name == "checkerboard"

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact data log-density in nats, ``[B]`` for ``x`` of shape ``[B, 2]`` (mixtures and checkerboard)."""
        if self.oracle is not None:
            return self.oracle.log_prob(x)
        if self.name == "checkerboard":
            return checkerboard_log_prob(x)
        raise NotImplementedError(f"toy2d/{self.name} has no closed-form density")

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` fresh samples ``float64 [n, 2]`` and labels ``int64 [n]``."""
        return self._sampler(n, generator)

    def _load(self) -> dict[str, Dataset]:
        seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(self.seed).spawn(3)]
        out: dict[str, Dataset] = {}
        for (split, n), s in zip(self.sizes.items(), seeds):
            x, y = self.sample(n, torch.Generator().manual_seed(s))
            out[split] = ArrayDataset(x.float(), y.long())
        return out


def render_png(
    path: str | Path,
    log_prob: Callable[[Tensor], Tensor] | None = None,
    samples: Tensor | None = None,
    extent: float = 3.5,
    resolution: int = 200,
    title: str | None = None,
) -> Path:
    """Write a heatmap of ``exp(log_prob)`` on ``[-extent, extent]^2`` and/or a 2-D histogram of ``samples``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (log_prob, samples) if p is not None]
    if not panels:
        raise ValueError("render_png needs log_prob, samples or both")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    box = [-extent, extent, -extent, extent]
    i = 0
    if log_prob is not None:
        g = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        dens = log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)).exp().reshape(resolution, resolution)
        axes[0, i].imshow(dens.numpy(), origin="lower", extent=box, cmap="magma")
        axes[0, i].set_title("density")
        i += 1
    if samples is not None:
        s = samples.detach().reshape(-1, 2).double().cpu().numpy()
        axes[0, i].hist2d(s[:, 0], s[:, 1], bins=resolution // 2, range=[box[:2], box[2:]], cmap="magma")
        axes[0, i].set_title(f"{len(s)} samples")
    for ax in axes[0]:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
