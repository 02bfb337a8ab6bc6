"""The docstrings' examples run, on the installed package (issue 11 item 6)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kronlin

MODULES = sorted(m.name for m in pkgutil.walk_packages(kronlin.__path__, "kronlin.")
                 if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run doctest -v)"


def test_examples_exist():
    attempted = sum(doctest.testmod(importlib.import_module(n), report=False).attempted for n in MODULES)
    assert attempted >= 20  # Kron, KronSumInverse, SchurStein, WoodburyFisher, FactorEstimator examples
