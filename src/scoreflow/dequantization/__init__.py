"""Dequantizers: uniform and variational (a conditional flow q(u|x))."""

from scoreflow.dequantization.base import Dequantizer
from scoreflow.dequantization.uniform import UniformDequantizer

__all__ = ["Dequantizer", "UniformDequantizer"]
