"""Pictures: sample grids and 2-D scatter plots saved as PNG (matplotlib with the Agg backend)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def levels_to_unit(x: Tensor, num_levels: int | None) -> Tensor:
    """Samples in ``[0, 1]`` data space -> quantized to the K levels and shown in ``[0, 1]``."""
    x = x.clamp(0, 1)
    if num_levels is None:
        return x
    k = (x * num_levels).floor().clamp(0, num_levels - 1)
    return k / (num_levels - 1)


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Save ``[N, C, H, W]`` images in ``[0, 1]`` as one PNG grid (small images are upscaled for viewing)."""
    from torchvision.utils import make_grid, save_image

    images = images.detach().float().cpu()
    n, _, h, _ = images.shape
    nrow = nrow or max(1, int(round(n**0.5)))
    up = upscale or max(1, 64 // h)
    if up > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=up, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), path)
    return path


def save_scatter(x: Tensor, path: str | Path, title: str = "", lim: float | None = None) -> Path:
    """Scatter plot of 2-D points ``[N, 2]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu().reshape(x.shape[0], -1)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.6)
    if lim:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_title(title)
    ax.set_aspect("equal")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def log_image(logger: object, key: str, path: str | Path, step: int | None = None) -> None:
    """Log the PNG at ``path`` as ``key`` at ``step`` to a Lightning ``WandbLogger`` or ``TensorBoardLogger`` (by
    class name: no Lightning import here); other loggers (CSV) keep no images."""
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key=key, images=[str(path)], step=step)
    elif name == "TensorBoardLogger":
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
        logger.experiment.add_image(key, img, global_step=step, dataformats="HWC")
        logger.experiment.flush()
