"""Every standard error scoreflow reports comes from one function, scoreflow.likelihood.mean_and_se: the
validation metric (MeanSE), the test phase / evaluate.py (mean_se_over_images) give its answer, including
NaN for a single value."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from scoreflow.likelihood import mean_and_se
from scoreflow.lit.metrics import MeanSE
from scoreflow.lit.per_image import mean_se_over_images, nonfinite_images


@pytest.mark.parametrize("n", [1, 2, 7])
def test_meanse_metric_is_mean_and_se(n):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) + 3
    metric = MeanSE()
    metric.update(v[: n // 2 + 1].float())
    metric.update(v[n // 2 + 1 :].float())
    m, se = metric.compute().tolist()
    ref = mean_and_se(v.float())
    assert m == pytest.approx(ref[0], rel=1e-12)
    if n == 1:
        assert math.isnan(se) and math.isnan(ref[1])
    else:
        assert se == pytest.approx(ref[1], rel=1e-12) and se == pytest.approx(stats.sem(v.float().numpy()), rel=1e-6)
    metric.reset()
    assert metric.count == 0 and all(math.isnan(x) for x in metric.compute().tolist())


def test_over_images_is_mean_and_se_of_the_image_means():
    table = np.array([[1.0, 3.0], [np.nan, 4.0], [np.nan, np.nan], [6.0, 6.0]])
    m, se, n = mean_se_over_images(table)
    assert n == 3 and (m, se) == mean_and_se([2.0, 4.0, 6.0]) and se == pytest.approx(2 / math.sqrt(3))
    m1, se1, n1 = mean_se_over_images(np.array([[2.0, 4.0]]))
    assert (m1, n1) == (3.0, 1) and math.isnan(se1)


def test_a_computed_non_finite_value_is_kept_and_counted_not_taken_for_missing():
    """NaN marked a value not computed yet, so a diverged image (a NaN NLL) was left out of the mean while the
    image count still included it (audit: 4.5632 ± 0.0751 over 16 images became 4.5272 ± 0.0704 "over 16")."""
    table = np.array([[1.0, 3.0], [np.nan, 4.0], [np.nan, np.nan], [6.0, 6.0]])
    computed = np.array([[True, True], [False, True], [False, False], [True, True]])
    assert mean_se_over_images(table, computed) == mean_se_over_images(table)  # only missing values: as before
    assert nonfinite_images(table, computed) == 0
    computed[2, 0] = True  # image 2's first repeat was computed, and is NaN
    m, se, n = mean_se_over_images(table, computed)
    assert n == 4 and math.isnan(m) and math.isnan(se) and nonfinite_images(table, computed) == 1
    table[2, 0] = np.inf
    m, _, n = mean_se_over_images(table, computed)
    assert n == 4 and m == math.inf and nonfinite_images(table, computed) == 1
