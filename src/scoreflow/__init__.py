"""scoreflow: maximum-likelihood training of score-based diffusion models.

The maths (``sde``, ``weighting``, ``losses``, ``likelihood``, ``dequantization``, ``sampling``,
``nets``) is plain PyTorch; Lightning and Hydra live only in ``scoreflow.lit`` and ``scoreflow.tasks``.
"""

__version__ = "0.1.0"
