"""Array-namespace layer: which library computes, in which dtype, and how results go back.

kronlin's algebra is written once against the array API standard (the functions
NumPy >= 2, CuPy and ``array_api_strict`` share).  This module decides, for a
set of input arrays, the *compute namespace* and the *result dtype*, converts
inputs into it, and converts results back into the caller's library:

* NumPy arrays (and Python scalars, lists) compute on NumPy, with kronlin's C++
  kernels where they exist;
* CuPy arrays compute on CuPy, with kronlin's CUDA kernels;
* ``array_api_strict`` arrays compute on ``array_api_strict`` (the proof, in
  the test suite, that nothing depends on NumPy-only behaviour);
* any other object with ``__dlpack__`` (torch, jax) is taken zero-copy by
  DLPack into NumPy (CPU) or CuPy (CUDA) and results are handed back through
  the caller's ``from_dlpack``.

Dtype policy (docs/design.md §1): float32 and float64 are kept; integer and bool
inputs are promoted to float64; mixed float inputs compute in the wider type;
float16, complex, object and string dtypes are rejected.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "Ctx", "context", "is_numpy", "is_cupy", "mT", "to_numpy", "dtype_eps", "owned_copy", "ModuleRefs", "trace",
    "matrix_norm",
]

_NATIVE = ("numpy", "cupy", "array_api_strict")
_PLAIN = (int, float, bool, list, tuple, np.generic)
_CPU_DLPACK, _CUDA_DLPACK = 1, 2


@dataclass(frozen=True)
class Ctx:
    """Where and how a computation runs.

    Attributes
    ----------
    xp : module
        The compute namespace (``numpy``, ``cupy``, ``array_api_strict``).
    dtype : dtype
        The floating dtype of the computation and its results.
    foreign : module or None
        For torch/jax inputs: the library whose ``from_dlpack`` receives results.
    """

    xp: Any
    dtype: Any
    foreign: Any = None

    @property
    def name(self) -> str:
        return _ns_name(self.xp)

    def __reduce__(self):
        # pickled by the libraries' *names*: modules do not pickle (DESIGN: operators pickle and deep-copy)
        foreign = None if self.foreign is None else self.foreign.__name__
        return (_ctx_from_names, (self.xp.__name__, _dtype_name(self.xp, self.dtype), foreign))

    def out(self, x):
        """Return a freshly computed result array in the caller's library, dtype and device."""
        if x is None:
            return x
        if self.foreign is None:
            return x
        if is_numpy(self.xp):
            x = np.asarray(x)  # a NumPy scalar has no DLPack export
            if _ns_name(self.foreign) == "jax":
                # JAX takes only compact, writable buffers by DLPack; asarray copies whatever it gets
                return self.foreign.asarray(x)
            if not x.flags.writeable:
                x = x.copy()
        elif _ns_name(self.foreign) == "jax":
            # compact for JAX's DLPack import; ascontiguousarray alone makes a 0-d result 1-d
            x = self.xp.ascontiguousarray(x).reshape(x.shape)
        return self.foreign.from_dlpack(x)

    def out_copy(self, x):
        """A copy of internal state in the caller's library: accessors never hand out live views."""
        return self.out(owned_copy(self.xp, x))

    def scalar(self, x):
        """A scalar result (0-d, or of the batch shape): a NumPy scalar for NumPy, else a 0-d array.

        Always in the context's dtype and the caller's library.
        """
        xp = self.xp
        x = xp.asarray(x, dtype=self.dtype) if not hasattr(x, "dtype") or x.dtype != self.dtype else x
        if is_numpy(xp) and self.foreign is None:
            return x[()] if x.ndim == 0 else x
        return self.out(x)

    def asarray(self, x, name: str, index: int | None = None):
        """Convert a later argument (a right-hand side) into this context's namespace.

        Its dtype is promoted with the context's: a float64 right-hand side
        against a float32 operator computes (and returns) float64.  ``index``:
        the argument is ``name[index]`` (one of a list; the name is built only
        for an error).
        """
        if self.xp is np and type(x) is np.ndarray and self.foreign is None and x.dtype == self.dtype:
            return x  # the common case, decided without the namespace lookups (per-layer blocks: 200 calls an apply)
        if index is not None:
            name = f"{name}[{index}]"
        ns, fr = _namespace_of(x, name)
        plain = isinstance(x, _PLAIN)
        if fr is not None and (fr is not self.foreign and (self.foreign is None or _ns_name(fr) != _ns_name(self.foreign))):
            who = "NumPy" if self.foreign is None else _ns_name(self.foreign)
            raise TypeError(
                f"{name} is a {_ns_name(fr)} array but the operator was built from {who} arrays; "
                f"pass arrays of one library"
            )
        if not plain and _ns_name(ns) != self.name:
            raise TypeError(
                f"{name} is a {_ns_name(ns)} array but the operator computes on {self.name}; "
                f"pass arrays of one library"
            )
        arr = _plain_array(self.xp, x, name) if plain else _convert(x, self.xp, fr, name)
        _check_dtype(arr, name, self.xp)
        dtype = self.xp.result_type(self.dtype, _float_dtype(self.xp, arr.dtype))
        return arr if arr.dtype == dtype else self.xp.astype(arr, dtype)


def _ns_name(xp) -> str:
    name = getattr(xp, "__name__", type(xp).__name__)
    return name.split(".")[0]


def is_numpy(xp) -> bool:
    return xp is np


def is_cupy(xp) -> bool:
    return _ns_name(xp) == "cupy"


def _ctx_from_names(xp_name: str, dtype_name: str, foreign_name):
    xp = importlib.import_module(xp_name)
    foreign = None if foreign_name is None else importlib.import_module(foreign_name)
    dtype = np.dtype(dtype_name) if is_numpy(xp) or is_cupy(xp) else getattr(xp, dtype_name)
    return Ctx(xp, dtype, foreign)


def _dtype_name(xp, dtype) -> str:
    return "float32" if dtype == xp.float32 else "float64"


class _ModuleName:
    """A module held by an object, pickled as its name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Fortran:
    """A Fortran-ordered array on its way through pickle or ``copy.deepcopy``, restored Fortran-ordered.

    CuPy pickles and deep-copies arrays to C order, and cuBLAS rounds a GEMM
    differently for the two layouts, so a copied operator would solve to
    within rounding instead of identically (seen on an H100 with
    eigenvectors, which cuSOLVER returns column-major).
    """

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def _mark_layout(v):
    flags = getattr(v, "flags", None)
    if flags is not None and getattr(flags, "f_contiguous", False) and not flags.c_contiguous:
        return _Fortran(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_mark_layout(x) for x in v)
    if isinstance(v, dict):
        return {k: _mark_layout(x) for k, x in v.items()}
    return v


def _restore_layout(v):
    if isinstance(v, _Fortran):
        arr = v.array
        if isinstance(arr, np.ndarray):
            return np.asfortranarray(arr)
        return sys.modules[type(arr).__module__.split(".")[0]].asfortranarray(arr)  # CuPy
    if isinstance(v, (list, tuple)):
        return type(v)(_restore_layout(x) for x in v)
    if isinstance(v, dict):
        return {k: _restore_layout(x) for k, x in v.items()}
    return v


class ModuleRefs:
    """Pickling for objects that hold array-library modules (``xp``): they travel as names.

    Arrays keep their memory layout through pickle and ``copy.deepcopy``
    (:class:`_Fortran`), so a copy computes bit-identically.
    """

    def __getstate__(self):
        return {
            k: _ModuleName(v.__name__) if isinstance(v, ModuleType) else _mark_layout(v)
            for k, v in self.__dict__.items()
        }

    def __setstate__(self, state):
        for k, v in state.items():
            if isinstance(v, _ModuleName):
                setattr(self, k, importlib.import_module(v.name))
            else:
                setattr(self, k, canonical_arrays(_restore_layout(v)))


def canonical_arrays(v):
    """Unpickled NumPy arrays carry a fresh copy of their dtype object; the compiled kernels accept only
    NumPy's own float32/float64 dtype objects, so arrays (also inside lists, tuples and dicts) get a view
    with the canonical one."""
    if isinstance(v, np.ndarray):
        canon = np.dtype(v.dtype.str)
        return v if v.dtype is canon else v.view(canon)
    if isinstance(v, (list, tuple)):
        return type(v)(canonical_arrays(x) for x in v)
    if isinstance(v, dict):
        return {k: canonical_arrays(x) for k, x in v.items()}
    return v


def owned_copy(xp, x):
    """A copy of ``x`` that no caller holds (snapshot semantics; results never alias internal state)."""
    if is_numpy(xp) or is_cupy(xp):
        return x.copy()
    return xp.asarray(x, copy=True)


_HALF = ("float16", "bfloat16", "half")


def _reject_traced_or_half(x, name: str) -> None:
    cls = type(x)
    if cls.__module__.startswith("jax") and "Tracer" in cls.__name__:
        raise TypeError(
            f"{name} is a traced JAX value ({cls.__name__}): kronlin computes eagerly on concrete arrays, "
            f"so it cannot run inside jax.jit, jax.grad or jax.vmap directly; inside jit, wrap the call with "
            f"kronlin.jax_callback (a jax.pure_callback) or call kronlin outside the traced function"
        )
    dt = str(getattr(x, "dtype", "")).split(".")[-1]
    if dt in _HALF:
        raise TypeError(f"{name} has dtype {dt}; kronlin computes in float32 or float64, cast it first")


def _namespace_of(x, name: str):
    """Return ``(compute namespace, foreign library or None)`` of one input."""
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray) or isinstance(x, _PLAIN):
        return np, None
    if mod == "cupy":
        return sys.modules["cupy"], None
    if hasattr(x, "__array_namespace__"):
        ns = x.__array_namespace__()
        if _ns_name(ns) in _NATIVE:
            return ns, None
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        device_type = int(x.__dlpack_device__()[0])
        foreign = x.__array_namespace__() if hasattr(x, "__array_namespace__") else None
        if foreign is None or not hasattr(foreign, "from_dlpack"):
            foreign = sys.modules.get(mod)
        if device_type == _CPU_DLPACK:
            return np, foreign
        if device_type == _CUDA_DLPACK:
            try:
                import cupy
            except ImportError as exc:  # tested with a stand-in object (tests/test_torch_cuda.py)
                raise TypeError(
                    f"{name} lives on a CUDA device; install CuPy to compute on it "
                    f'(pip install ".[cuda]" in the kronlin source folder)'
                ) from exc
            return cupy, foreign
        raise TypeError(f"{name} is on DLPack device type {device_type}; kronlin computes on CPU or CUDA only")
    _reject_traced_or_half(x, name)
    raise TypeError(
        f"{name} must be an array (NumPy, CuPy, or any DLPack-capable array such as torch/jax); "
        f"got {type(x).__name__}"
    )


def _plain_array(xp, x, name: str):
    """A Python scalar or (nested) list as an array; a ragged list is an error naming the argument."""
    try:
        return xp.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not a rectangular array ({exc}); pass an array or a nested list of equal-length rows") from None


def _convert(x, xp, foreign, name: str):
    if foreign is not None:
        _reject_traced_or_half(x, name)
        if getattr(x, "requires_grad", False):
            raise TypeError(
                f"{name} requires grad: kronlin's results are not differentiable by autograd; pass "
                f"{name}.detach() (and treat the result as a constant)"
            )
        try:
            return xp.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TypeError(
                f"{name} could not be taken by DLPack ({exc}); detach it from autograd "
                f"or make it contiguous first"
            ) from exc
    return xp.asarray(x)


def _check_dtype(arr, name: str, xp) -> None:
    dt = arr.dtype
    if xp is np or is_cupy(xp):
        kind = np.dtype(dt).kind
        if kind == "f":
            if np.dtype(dt).itemsize < 4:
                raise TypeError(f"{name} has dtype {dt}; kronlin computes in float32 or float64, cast it first")
            if np.dtype(dt).itemsize > 8:
                raise TypeError(f"{name} has dtype {dt}; extended precision is not supported, cast to float64")
            return
        if kind in "iub":
            return
        if kind == "c":
            raise TypeError(f"{name} has complex dtype {dt}; kronlin works with real matrices only")
        raise TypeError(f"{name} has dtype {dt} (not numeric); pass a float32 or float64 array")
    if xp.isdtype(dt, "real floating"):
        if dt not in (xp.float32, xp.float64):
            raise TypeError(f"{name} has dtype {dt}; kronlin computes in float32 or float64, cast it first")
        return
    if xp.isdtype(dt, ("integral", "bool")):
        return
    raise TypeError(f"{name} has dtype {dt}; kronlin works with real float32/float64 matrices only")


def _float_dtype(xp, dt):
    """float32/float64 stay, in the machine's byte order; integers and bools become float64."""
    if xp is np or is_cupy(xp):
        return np.dtype(dt).newbyteorder("=") if np.dtype(dt).kind == "f" else xp.float64
    return dt if xp.isdtype(dt, "real floating") else xp.float64


def context(*named, snapshot: bool = False):
    """Build the context of a call and convert its arrays.

    Parameters
    ----------
    *named : (name, array) pairs
        The array inputs of one public call, with the argument names used in
        error messages.  Python scalars and lists join the namespace of the
        first real array.
    snapshot : bool
        Constructors pass True: every returned array is then owned by kronlin
        (copied unless the conversion already made a new array), so mutating
        the caller's arrays later never changes the operator (DESIGN: snapshot
        semantics).

    Returns
    -------
    ctx : Ctx
    arrays : list
        The inputs in ``ctx.xp`` with dtype ``ctx.dtype``.
    """
    if named and all(type(x) is np.ndarray for _, x in named):  # NumPy arrays of one float dtype: as they are
        dtype = named[0][1].dtype
        if dtype.char in "fd" and dtype.isnative and all(x.dtype == dtype for _, x in named):
            return Ctx(np, dtype, None), [owned_copy(np, x) if snapshot else x for _, x in named]
    xp = foreign = first = None
    infos = []
    for name, x in named:
        if type(x) is np.ndarray:  # the common case, decided without the general dispatch (5 → 1.5 µs an array)
            ns, fr, plain = np, None, False
        else:
            ns, fr = _namespace_of(x, name)
            plain = isinstance(x, _PLAIN)
        if not plain:
            if first is None:
                xp, foreign, first = ns, fr, name
            elif ns is not xp and _ns_name(ns) != _ns_name(xp):
                raise TypeError(
                    f"{name} is a {_ns_name(ns)} array but {first} is a {_ns_name(xp)} array; "
                    f"pass arrays of one library"
                )
        infos.append((name, x, fr, plain))
    if xp is None:
        xp = np
    arrays = []
    for name, x, fr, plain in infos:
        if xp is np and type(x) is np.ndarray and x.dtype.char in "fd" and x.dtype.isnative:  # as it is
            arrays.append(x)
            continue
        arr = _plain_array(xp, x, name) if plain else _convert(x, xp, fr, name)
        _check_dtype(arr, name, xp)
        arrays.append(arr)
    if not arrays:
        raise TypeError("no array arguments given")
    dtypes = {arr.dtype for arr in arrays}
    dtype = _float_dtype(xp, arrays[0].dtype)
    if len(dtypes) > 1 or dtype != arrays[0].dtype:
        for arr in arrays[1:]:
            dtype = xp.result_type(dtype, _float_dtype(xp, arr.dtype))
    arrays = [
        xp.astype(a, dtype) if a.dtype != dtype else owned_copy(xp, a) if snapshot and not isinstance(x, _PLAIN) else a
        for a, (_, x, _, _) in zip(arrays, infos)
    ]
    return Ctx(xp, dtype, foreign), arrays


def mT(x):
    """Transpose of the last two axes (a view where the library allows it)."""
    try:
        return x.mT
    except AttributeError:  # pragma: no cover - older CuPy
        return x.swapaxes(-1, -2)


def native_float(x) -> bool:
    """float32 or float64 in the machine's byte order, aligned: what compiled code and BLAS calls take directly
    (a big-endian array, e.g. read from a portable file, or an unaligned one, e.g. a field of a packed record
    or a buffer read at an odd offset, goes the generic way; CuPy arrays have no alignment flag)."""
    return x.dtype.char in "fd" and x.dtype.isnative and getattr(x.flags, "aligned", True)


def diagonal(xp, M):
    """The diagonal(s) over the last two axes (``xp.linalg.diagonal``; CuPy 14 has only ``cupy.diagonal``)."""
    return xp.linalg.diagonal(M) if hasattr(xp.linalg, "diagonal") else xp.diagonal(M, axis1=-2, axis2=-1)


def trace(xp, M):
    """Trace over the last two axes (``xp.linalg.trace``; CuPy 14 has only ``cupy.trace``)."""
    if hasattr(xp.linalg, "trace"):
        return xp.linalg.trace(M)
    return xp.trace(M, axis1=-2, axis2=-1)


def matrix_norm(xp, M, ord):
    """Matrix norm over the last two axes (``xp.linalg.matrix_norm``; CuPy 14 has only ``cupy.linalg.norm``)."""
    if hasattr(xp.linalg, "matrix_norm"):
        return xp.linalg.matrix_norm(M, ord=ord)
    return xp.linalg.norm(M, ord=ord, axis=(-2, -1))


def to_numpy(x) -> np.ndarray:
    """Copy any supported array to NumPy (for tests, reports and SciPy-only routines)."""
    if isinstance(x, (np.ndarray, np.generic, int, float)):
        return np.asarray(x)
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.from_dlpack(x)


def dtype_eps(xp, dtype) -> float:
    """Machine epsilon of a float dtype of namespace ``xp``."""
    return float(xp.finfo(dtype).eps)
