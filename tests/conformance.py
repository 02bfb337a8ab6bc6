"""The operator contract as one test class (docs/design.md §2), run on every backend present.

Each operator's test class inherits :class:`OperatorConformance` and supplies
only how to build the operator from arrays of a backend (``build``) and an
independent dense reference of what each method computes (``refs``, from
``np.kron`` and ``scipy.linalg`` on float64 data).  The class then checks the
calling contract the same way for all of them: ``@``/``solve``/``logdet``/
``to_dense``/``matmat``/``aslinearoperator`` against the references, matrix,
list, flat and batched right-hand sides, results in the caller's library and
dtype, scalar results as 0-d arrays of that library, pickling and deep copies,
snapshot semantics, accessors that are not live views, and bad input.

Backends: NumPy, array-api-strict, torch (CPU), JAX (CPU) whenever they are
importable, and CuPy / torch CUDA whenever CuPy sees a device.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from kronlin.testing import layers_vec


# -- backends --------------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    make: Callable[[np.ndarray, str], Any]  # float64 NumPy data, dtype name -> an array of the library
    to_np: Callable[[Any], np.ndarray]
    is_mine: Callable[[Any], bool]  # the result is an array of this library
    dtype_of: Callable[[Any], str]  # "float32" / "float64"
    mutate: Callable[[Any], None] | None  # in-place change of a caller's array (None: immutable)
    ndim: Callable[[Any], int]
    host: Callable[[np.ndarray], Any] = np.asarray  # a vector for aslinearoperator() (CuPy's on a GPU)


def _numpy():
    return Backend(
        "numpy",
        lambda a, dt: np.array(a, dtype=dt),
        np.asarray,
        lambda x: isinstance(x, (np.ndarray, np.generic)),
        lambda x: str(x.dtype),
        lambda x: x.__imul__(2.0),
        np.ndim,
    )


def _array_api_strict():
    import array_api_strict as xs

    def mutate(x):
        x[...] = x * 2.0

    return Backend(
        "array_api_strict",
        lambda a, dt: xs.asarray(np.array(a, dtype=dt)),
        lambda x: np.from_dlpack(x).copy(),
        lambda x: type(x).__module__.startswith("array_api_strict"),
        lambda x: str(x.dtype).split(".")[-1],
        mutate,
        lambda x: x.ndim,
    )


def _torch(device="cpu"):
    import torch

    def to_np(x):
        return x.detach().cpu().numpy().copy()

    host = np.asarray
    if device != "cpu":  # torch CUDA tensors compute on CuPy: the LinearOperator is cupyx's
        import cupy

        host = cupy.asarray
    return Backend(
        "torch" if device == "cpu" else "torch_cuda",
        lambda a, dt: torch.tensor(np.array(a, dtype=dt), device=device),
        to_np,
        lambda x: isinstance(x, torch.Tensor) and x.device.type == device,
        lambda x: str(x.dtype).split(".")[-1],
        lambda x: x.mul_(2.0),
        lambda x: x.dim(),
        host,
    )


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return Backend(
        "jax",
        lambda a, dt: jnp.asarray(np.array(a, dtype=dt)),
        lambda x: np.asarray(x).copy(),
        lambda x: isinstance(x, jax.Array),
        lambda x: str(x.dtype),
        None,  # JAX arrays are immutable: snapshot semantics hold by construction
        lambda x: x.ndim,
    )


def _cupy():
    import cupy

    return Backend(
        "cupy",
        lambda a, dt: cupy.asarray(np.array(a, dtype=dt)),
        lambda x: cupy.asnumpy(x),
        lambda x: isinstance(x, cupy.ndarray),
        lambda x: str(x.dtype),
        lambda x: x.__imul__(2.0),
        lambda x: x.ndim,
        cupy.asarray,
    )


def _gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return False


def backend_params():
    """pytest params for every backend; absent libraries are skipped with the reason."""
    out = []
    for name, factory, needs in (
        ("numpy", _numpy, None),
        ("array_api_strict", _array_api_strict, "array_api_strict"),
        ("torch", _torch, "torch"),
        ("jax", _jax, "jax"),
    ):
        try:
            if needs:
                __import__(needs)
            out.append(pytest.param(factory, id=name))
        except ImportError:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(f"{needs} is not installed")))
    gpu = _gpu_present()
    out.append(pytest.param(_cupy, id="cupy", marks=[pytest.mark.cuda] + ([] if gpu else [pytest.mark.skip("no CuPy device")])))
    torch_gpu = False
    if gpu:
        try:
            import torch

            torch_gpu = torch.cuda.is_available()
        except ImportError:
            pass
    out.append(pytest.param(lambda: _torch("cuda"), id="torch_cuda",
                            marks=[pytest.mark.cuda] + ([] if torch_gpu else [pytest.mark.skip("no torch CUDA device")])))
    return out


#: Relative tolerances against the float64 dense references.  The reference is
#: computed from the same (rounded) inputs, so the error is the solver's own:
#: a few hundred ulps for the conditionings used here (cond <= ~100).
TOL = {"float32": 2e-4, "float64": 1e-10}


def _host_to_np(x) -> np.ndarray:
    return x.get() if type(x).__module__.split(".")[0] == "cupy" else np.asarray(x)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(np.linalg.norm(ref), 1e-300)
    return float(np.linalg.norm(got - ref) / scale)


# -- the contract ----------------------------------------------------------------------------
class OperatorConformance:
    """Inherit, then define ``blocks``, ``layered``, ``build`` and ``refs`` (see the module docstring).

    ``build(make)`` gets a function ``make(name)`` returning the named input
    array (from ``data()``) in the backend under test and returns the
    operator.  ``refs(data)`` returns a dict with (any of) the keys
    ``"forward"`` (the dense matrix the forward method applies), ``"solve"``,
    ``"matmat"``, ``"linop"``, ``"to_dense"`` (dense matrices on flat vectors) and
    ``"logdet"`` (a float).
    """

    blocks: list = []  # [(q, p), ...]
    layered = False  # right-hand sides are lists of per-layer blocks
    forward = "__matmul__"  # the method applying the operator itself
    accessors: tuple = ()  # attributes/methods that return internal arrays
    batched_rhs = True

    # subclasses: data() -> dict of float64 arrays; build(make) -> operator; refs(data) -> dict
    @pytest.fixture(params=backend_params())
    def be(self, request):
        return request.param()

    @pytest.fixture(params=["float64", "float32"])
    def dtype(self, request):
        return request.param

    # -- helpers ------------------------------------------------------------------------
    def _data(self, dtype):
        # the references see exactly the rounded inputs the operator sees
        return {k: np.asarray(np.asarray(v, dtype=dtype), dtype=np.float64) for k, v in self.data().items()}

    def _op(self, be, dtype):
        data = self.data()
        made = {}

        def make(name):
            made[name] = be.make(data[name], dtype)
            return made[name]

        return self.build(make), made

    def _refs(self, dtype):
        return self.refs(self._data(dtype))

    def _rhs_np(self, lead=(), seed=0):
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(lead + tuple(b)) for b in self.blocks]

    def _as_rhs(self, be, blocks, dtype):
        if self.layered:
            return [be.make(b, dtype) for b in blocks]
        return be.make(blocks[0], dtype)

    def _check_result(self, be, got, dtype, like):
        """``got`` in the caller's library and dtype; returns it as NumPy blocks (a list)."""
        items = got if isinstance(got, list) else [got]
        assert isinstance(got, list) == isinstance(like, list)
        for g in items:
            assert be.is_mine(g), f"result is a {type(g).__module__}.{type(g).__name__}, not a {be.name} array"
            assert be.dtype_of(g) == dtype
        return [be.to_np(g) for g in items]

    def _check_method(self, be, dtype, method, ref, **kw):
        op, _ = self._op(be, dtype)
        fn = getattr(op, method)
        # matrix (or list) right-hand side
        X = self._rhs_np()
        got = self._check_result(be, fn(self._as_rhs(be, X, dtype), **kw), dtype, [] if self.layered else None)
        assert rel_err(layers_vec(got), ref @ layers_vec(X)) < TOL[dtype]
        # a flat column-stacked vector
        v = layers_vec(X)
        (g,) = self._check_result(be, fn(be.make(v, dtype), **kw), dtype, None)
        assert g.shape == v.shape and rel_err(g, ref @ v) < TOL[dtype]
        if not self.batched_rhs:
            return
        # leading batch dimensions: blocks (2, 3, q, p) and flat (2, 3, P)
        Xb = self._rhs_np((2, 3), seed=1)
        want = layers_vec(Xb) @ ref.T
        got = self._check_result(be, fn(self._as_rhs(be, Xb, dtype), **kw), dtype, [] if self.layered else None)
        assert all(g.shape == x.shape for g, x in zip(got, Xb))
        assert rel_err(layers_vec(got), want) < TOL[dtype]
        (g,) = self._check_result(be, fn(be.make(layers_vec(Xb), dtype), **kw), dtype, None)
        assert g.shape == (2, 3, v.shape[0]) and rel_err(g, want) < TOL[dtype]

    def _need(self, key, dtype):
        refs = self._refs(dtype)
        if key not in refs:
            pytest.skip(f"{type(self).__name__} has no {key}")
        return refs[key]

    # -- the tests ----------------------------------------------------------------------
    def test_forward(self, be, dtype):
        self._check_method(be, dtype, self.forward, self._need("forward", dtype))

    def test_solve(self, be, dtype):
        self._check_method(be, dtype, "solve", self._need("solve", dtype))

    def test_logdet_is_a_0d_array_of_the_callers_library(self, be, dtype):
        ref = self._need("logdet", dtype)
        op, _ = self._op(be, dtype)
        got = op.logdet()
        assert be.is_mine(got) and be.ndim(got) == 0 and be.dtype_of(got) == dtype
        if be.name == "numpy":
            assert isinstance(got, np.generic)  # a NumPy scalar for NumPy, like NumPy's own reductions
        assert abs(float(be.to_np(got)) - ref) <= TOL[dtype] * max(1.0, abs(ref)) * 10

    def test_to_dense(self, be, dtype):
        ref = self._need("to_dense", dtype)
        op, _ = self._op(be, dtype)
        (D,) = self._check_result(be, op.to_dense(), dtype, None)
        assert rel_err(D, ref) < TOL[dtype]

    def test_matmat_and_rmatmat(self, be, dtype):
        ref = self._need("matmat", dtype)
        op, _ = self._op(be, dtype)
        V = np.random.default_rng(2).standard_normal((ref.shape[0], 3))
        (Y,) = self._check_result(be, op.matmat(be.make(V, dtype)), dtype, None)
        assert rel_err(Y, ref @ V) < TOL[dtype]
        (Y,) = self._check_result(be, op.rmatmat(be.make(V, dtype)), dtype, None)
        assert rel_err(Y, ref.T @ V) < TOL[dtype]

    def test_aslinearoperator(self, be, dtype):
        ref = self._need("linop", dtype)
        op, _ = self._op(be, dtype)
        L = op.aslinearoperator()
        n = ref.shape[0]
        assert L.shape == (n, n)
        rng = np.random.default_rng(3)
        v, V = rng.standard_normal(n), rng.standard_normal((n, 2))
        h, back = be.host, _host_to_np
        assert rel_err(back(L @ h(v)), ref @ v) < TOL[dtype]
        assert rel_err(back(L.matmat(h(V))), ref @ V) < TOL[dtype]
        assert rel_err(back(L.rmatvec(h(v))), ref.T @ v) < TOL[dtype]
        assert rel_err(back(L.H @ h(v)), ref.T @ v) < TOL[dtype]
        assert rel_err(back(L.T @ h(v)), ref.T @ v) < TOL[dtype]

    def test_aslinearoperator_validates_like_the_operator(self, be, dtype):
        self._need("linop", dtype)
        op, _ = self._op(be, dtype)
        L = op.aslinearoperator()
        n, h = L.shape[0], be.host
        with pytest.raises(ValueError, match=rf"length P = {n}: expected a vector of shape \({n},\).*got shape \({n + 1},\)"):
            L.matvec(h(np.ones(n + 1)))
        with pytest.raises(ValueError, match=rf"expected a matrix of shape \({n}, k\)"):
            L.matmat(h(np.ones((n - 1, 2))))
        bad = np.ones(n)
        bad[0] = np.nan
        with pytest.raises(ValueError, match="contains NaN or infinity"):
            L @ h(bad)
        bad[0] = np.inf
        with pytest.raises(ValueError, match="contains NaN or infinity"):
            L.rmatvec(h(bad))
        with pytest.raises(TypeError, match="complex"):
            L @ h(np.ones(n) + 1j)
        for T in (L.T, L.H):  # the transposes validate too
            with pytest.raises(ValueError, match=rf"length P = {n}"):
                T @ h(np.ones(n + 1))
            with pytest.raises(ValueError, match="contains NaN or infinity"):
                T @ h(bad)

    def test_pickle_and_deepcopy_compute_identically(self, be, dtype):
        op, _ = self._op(be, dtype)
        X = self._as_rhs(be, self._rhs_np(), dtype)
        method = "solve" if "solve" in self._refs(dtype) else self.forward
        want = getattr(op, method)(X)  # warm caches travel too
        for clone in (pickle.loads(pickle.dumps(op)), copy.deepcopy(op)):
            got = getattr(clone, method)(X)
            for a, b in zip(self._check_result(be, got, dtype, want), self._check_result(be, want, dtype, want)):
                np.testing.assert_array_equal(a, b)

    def test_snapshot_semantics(self, be, dtype):
        """Mutating the caller's arrays after construction changes nothing, cold or warm caches."""
        if be.mutate is None:
            pytest.skip(f"{be.name} arrays are immutable")
        refs = self._refs(dtype)
        X = self._rhs_np()
        for warm in (False, True):
            op, made = self._op(be, dtype)
            rhs = self._as_rhs(be, X, dtype)
            if warm:
                for key in ("solve", "forward"):
                    if key in refs:
                        getattr(op, "solve" if key == "solve" else self.forward)(rhs)
            for arr in made.values():
                be.mutate(arr)
            for key, method in (("forward", self.forward), ("solve", "solve")):
                if key in refs:
                    got = self._check_result(be, getattr(op, method)(rhs), dtype, [] if self.layered else None)
                    assert rel_err(layers_vec(got), refs[key] @ layers_vec(X)) < TOL[dtype], (key, warm)

    def test_accessors_are_copies(self, be, dtype):
        if not self.accessors:
            pytest.skip("no accessors")
        if be.mutate is None:
            pytest.skip(f"{be.name} arrays are immutable")
        refs = self._refs(dtype)
        key = "solve" if "solve" in refs else "forward"
        method = "solve" if key == "solve" else self.forward
        op, _ = self._op(be, dtype)
        X = self._rhs_np()
        for name in self.accessors:
            value = getattr(op, name)
            value = value() if callable(value) else value
            for arr in value if isinstance(value, (list, tuple)) else [value]:
                be.mutate(arr)
            got = self._check_result(be, getattr(op, method)(self._as_rhs(be, X, dtype)), dtype,
                                     [] if self.layered else None)
            assert rel_err(layers_vec(got), refs[key] @ layers_vec(X)) < TOL[dtype], name

    def test_bad_right_hand_sides(self, be, dtype):
        op, _ = self._op(be, dtype)
        fn = getattr(op, self.forward)
        X = self._rhs_np()
        X[0][0, 0] = np.nan
        with pytest.raises(ValueError, match="contains NaN or infinity"):
            fn(self._as_rhs(be, X, dtype))
        P = sum(q * p for q, p in self.blocks)
        with pytest.raises(ValueError, match=rf"P = {P}|p\*q = {P}"):
            fn(be.make(np.ones(P + 1), dtype))
        wrong = [np.ones((q + 1, p)) for q, p in self.blocks]
        with pytest.raises(ValueError, match="must have shape"):
            fn(self._as_rhs(be, wrong, dtype))
