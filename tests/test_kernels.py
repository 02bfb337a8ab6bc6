"""Compiled kernels against their NumPy references (one test module per kernel family)."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin import _ext
from kronlin._kernels.eig_scale import eig_scale, eig_scale_reference

from helpers import rel_err

POWERS = [-1.0, -0.5, 0.5, 1.0, -0.25, 2.0, 0.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (3, 13, 17), (2, 256, 300)])
def test_eig_scale_cpu_matches_reference(cpu_ext, dtype, power, shape):
    rng = np.random.default_rng(sum(shape))
    B, q, p = shape
    Y = rng.standard_normal(shape).astype(dtype)
    lg = rng.uniform(0.1, 3.0, (B, q)).astype(dtype)
    la = rng.uniform(0.1, 3.0, (B, p)).astype(dtype)
    ref = eig_scale_reference(np, Y, lg, la, 0.25, power)
    Yk = Y.copy()
    cpu_ext.eig_scale(Yk, lg, la, 0.25, power)
    # a few ulps: pow/sqrt/division are correctly rounded or within 1 ulp in both paths
    assert rel_err(Yk, ref) < (1e-15 if dtype == "float64" else 1e-6) * 4


def test_eig_scale_dispatch_broadcasts_eigenvalues(cpu_ext):
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((4, 3, 6, 5))
    lg = rng.uniform(1, 2, (3, 6))  # factor batch (3,) broadcast against Y's (4, 3)
    la = rng.uniform(1, 2, (5,))
    ref = eig_scale_reference(np, Y, lg, la, 0.0, -1.0)
    got = eig_scale(np, Y.copy(), lg, la, 0.0, -1.0)
    assert rel_err(got, ref) < 1e-15


def test_eig_scale_non_contiguous_takes_reference():
    Y = np.asfortranarray(np.ones((4, 3)))
    out = eig_scale(np, Y, np.ones(4), 2 * np.ones(3), 0.0, -1.0)
    assert np.allclose(out, 0.5) and np.allclose(Y, 1.0)


def test_eig_scale_binding_rejects_bad_layout(cpu_ext):
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.eig_scale(np.ones((1, 4, 3)).transpose(0, 2, 1), np.ones((1, 3)), np.ones((1, 4)), 0.0, -1.0)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_ext.eig_scale(np.ones((1, 2, 2)), np.ones((1, 2), np.float32), np.ones((1, 2)), 0.0, -1.0)
    with pytest.raises(ValueError, match="do not agree"):
        cpu_ext.eig_scale(np.ones((1, 2, 2)), np.ones((1, 3)), np.ones((1, 2)), 0.0, -1.0)


def test_disabled_context_forces_reference(cpu_ext):
    assert _ext.cpu() is cpu_ext
    with _ext.disabled():
        assert _ext.cpu() is None
    assert _ext.cpu() is cpu_ext
