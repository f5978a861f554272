"""Task functions behind train.py / evaluate.py / sample.py: compose, instantiate, run, return metrics."""
