"""Networks. Every net is called as ``net(x, label)``; :class:`ScoreModel` turns it into a score."""

from scoreflow.nets.mlp import MLP
from scoreflow.nets.ncsnpp import NCSNpp
from scoreflow.nets.score_model import ScoreModel
from scoreflow.nets.sp_checkpoint import CheckpointMismatchError, load_score_sde_checkpoint, save_score_sde_checkpoint
from scoreflow.nets.unet import UNet

__all__ = [
    "MLP",
    "NCSNpp",
    "UNet",
    "ScoreModel",
    "CheckpointMismatchError",
    "load_score_sde_checkpoint",
    "save_score_sde_checkpoint",
]
