"""``sample.py mode=conditional labels=...``: class indices in range, or a usage error naming the classes (an index
past the classifier's last class ended in an indexing traceback)."""

import pytest

from scoreflow.tasks.errors import ConfigError
from scoreflow.tasks.validate import class_labels


def test_labels_are_cycled_class_indices():
    assert class_labels(None, 5, 3) == [0, 1, 2, 0, 1]
    assert class_labels(2, 3, 10) == [2, 2, 2]
    assert class_labels([0, 9], 3, 10) == [0, 9, 0]


@pytest.mark.parametrize("spec", [10, -1, [0, 12], [0.7], [], True])
def test_out_of_range_or_non_integer_labels_are_refused(spec):
    with pytest.raises(ConfigError, match=r"labels must be class indices 0 \.\. 9 \(the classifier's 10 classes\)"):
        class_labels(spec, 4, 10)


@pytest.mark.parametrize("spec", [3.0, "a", [1, "b"]])
def test_labels_that_are_not_integers_are_refused_before_the_classes_are_known(spec):
    with pytest.raises(ConfigError, match=r"labels must be class indices \(integers\)"):
        class_labels(spec, 1, 0)
