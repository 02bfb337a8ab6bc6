"""Backend layer: namespace detection, dtype policy, DLPack round trips."""

from __future__ import annotations

import types

import numpy as np
import pytest

from kronlin import Kron, factored_damping
from kronlin._backend import context
from kronlin.testing import spd

from helpers import rel_err


def test_integer_and_bool_promote_to_float64():
    ctx, (a, b) = context(("a", np.arange(4).reshape(2, 2)), ("b", np.eye(2, dtype=bool)))
    assert ctx.dtype == np.float64 and a.dtype == np.float64 and b.dtype == np.float64


def test_float32_kept_and_mixed_floats_widen():
    ctx, _ = context(("a", np.eye(2, dtype=np.float32)))
    assert ctx.dtype == np.float32
    ctx, _ = context(("a", np.eye(2, dtype=np.float32)), ("b", np.eye(2)))
    assert ctx.dtype == np.float64
    ctx, _ = context(("a", np.eye(2, dtype=np.float32)), ("b", np.eye(2, dtype=np.int32)))
    assert ctx.dtype == np.float64  # an integer argument promotes to float64 first


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f8", ">f4"])
def test_numpy_arrays_of_one_float_dtype_pass_as_they_are_or_as_snapshots(dtype):
    """The quick path for NumPy arrays of one float dtype: the arrays themselves, or (snapshot) copies that no
    caller holds; a mixed list still widens, and a snapshot of it holds converted copies too.  Byte-swapped
    arrays are converted to the machine's byte order: an operator's dtype is float32 or float64, whatever the
    order of its inputs (an eigenbasis of big-endian factors refused native factors in ``refresh``)."""
    a, b = np.eye(3, dtype=dtype), np.ones((2, 2), dtype=dtype)
    native = np.dtype(dtype).newbyteorder("=")
    ctx, (x, y) = context(("a", a), ("b", b))
    assert ctx.dtype == native and x.dtype == y.dtype == native and x.dtype.isnative
    assert (x is a and y is b) if np.dtype(dtype).isnative else not (np.shares_memory(x, a) or np.shares_memory(y, b))
    ctx, (x, y) = context(("a", a), ("b", b), snapshot=True)
    assert not np.shares_memory(x, a) and not np.shares_memory(y, b)
    assert np.array_equal(x, a) and np.array_equal(y, b) and x.dtype == native
    ctx, (x, y) = context(("a", a), ("b", b.astype(np.float32 if native == np.float64 else np.float64)), snapshot=True)
    assert ctx.dtype == np.float64 and x.dtype == y.dtype == np.float64 and not np.shares_memory(x, a)


def test_lists_and_scalars_join_the_array_namespace():
    K = Kron([[2.0, 0.0], [0.0, 1.0]], [[3.0]])
    assert isinstance(K @ np.ones((1, 2)), np.ndarray)
    xps = pytest.importorskip("array_api_strict")
    ctx, (a, b) = context(("a", [[1.0]]), ("b", xps.asarray([[2.0]])))
    assert ctx.name == "array_api_strict" and type(a) is type(b)


class FakeTensor:
    """A foreign CPU array that only speaks DLPack, like a torch tensor."""

    def __init__(self, data):
        self._data = np.asarray(data)

    def __dlpack__(self, **kwargs):
        return self._data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._data.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return FAKE_LIB


FAKE_LIB = types.SimpleNamespace(__name__="fakelib", from_dlpack=lambda x: FakeTensor(np.from_dlpack(x)))


def test_foreign_dlpack_arrays_round_trip():
    rng = np.random.default_rng(0)
    A, G = spd(rng, 4, 10.0), spd(rng, 3, 10.0)
    X = rng.standard_normal((3, 4))
    K = Kron(FakeTensor(A), FakeTensor(G))
    out = K @ FakeTensor(X)
    assert isinstance(out, FakeTensor)
    assert rel_err(out._data, G @ X @ A.T) < 1e-14
    sol = K.eigh().solve(FakeTensor(X), damping=0.1)
    assert isinstance(sol, FakeTensor)
    assert isinstance(factored_damping(FakeTensor(A), FakeTensor(G), 0.1).A, FakeTensor)


def test_torch_round_trip_if_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    A, G = spd(rng, 4, 10.0), spd(rng, 3, 10.0)
    X = rng.standard_normal((3, 4))
    K = Kron(torch.from_numpy(A), torch.from_numpy(G))
    out = K.solve(torch.from_numpy(X))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert rel_err(out.numpy(), np.linalg.solve(G, X) @ np.linalg.inv(A).T) < 1e-13
    out32 = Kron(torch.eye(4), torch.eye(3)) @ torch.ones(3, 4)
    assert out32.dtype == torch.float32
