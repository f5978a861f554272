"""Networks. Every net is called as ``net(x, label)``; :class:`ScoreModel` turns it into a score."""

from scoreflow.nets.score_model import ScoreModel

__all__ = ["ScoreModel"]
