"""Sample-quality metrics: FID with TF-Inception-v3 pool3 features (plain PyTorch + torch-fidelity).

torch-fidelity is imported lazily, when an Inception network is first built.
"""

from scoreflow.metrics.fid import (
    FeatureExtractor,
    FeatureStats,
    compute_stats,
    default_extractor,
    fid_from_samples,
    frechet_distance,
    load_or_compute_ref_stats,
    ref_stats_path,
    to_uint8,
)
from scoreflow.metrics.inception import (
    FEATURE_DIM,
    WEIGHTS_ENV,
    InceptionFeatures,
    MissingInceptionWeightsError,
    resolve_inception_weights,
)

__all__ = [
    "FEATURE_DIM",
    "WEIGHTS_ENV",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatures",
    "MissingInceptionWeightsError",
    "compute_stats",
    "default_extractor",
    "fid_from_samples",
    "frechet_distance",
    "load_or_compute_ref_stats",
    "ref_stats_path",
    "resolve_inception_weights",
    "to_uint8",
]
