"""Dequantizers: uniform and variational (a conditional flow q(u|x))."""

from scoreflow.dequantization.base import Dequantizer, importance_weighted_nll, to_model_space
from scoreflow.dequantization.truncated import TruncatedNormalDequantizer
from scoreflow.dequantization.uniform import UniformDequantizer
from scoreflow.dequantization.variational import PRESETS, VariationalDequantizer

__all__ = [
    "PRESETS",
    "Dequantizer",
    "TruncatedNormalDequantizer",
    "UniformDequantizer",
    "VariationalDequantizer",
    "importance_weighted_nll",
    "to_model_space",
]
