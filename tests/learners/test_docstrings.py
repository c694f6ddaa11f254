import doctest
import importlib

import pytest

MODULES = [
    "learners.ab_test",
    "learners.active_learning",
    "learners.drift",
    "learners.features",
    "learners.loss_weights",
    "learners.off_policy",
    "learners.ridge",
    "learners.router",
    "streams.lease",
    "streams.lifecycle",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0
    assert result.failed == 0
