"""The bad-input matrix of issue 17 item 7: every public entry point, bad and well-posed inputs, three outcomes.

Each hypothesis example builds one call of a public kronlin name (constructors,
operator methods, ``aslinearoperator()`` products, functions) from well-posed
arguments, then replaces none, one or two of them by a bad value: ``None``,
strings, scalars or bare arrays where lists are expected, nested and ragged
lists, bool/int/complex/float16/object dtypes, a dimension more or less, wrong
or mismatched shapes, NaN/Inf, size 0, non-square, non-symmetric where symmetry
is required, indefinite where positive definiteness is, huge and tiny
magnitudes, negative/NaN/infinite/huge/tiny parameters, unknown choices,
non-bool switches.  The call is then classified:

* ``"error"`` — a ``ValueError``, ``TypeError``, ``LinAlgError`` or
  ``FloatingPointError`` whose message names a replaced argument (or, for a
  well-posed-looking problem the dense reference finds ill-posed — singular,
  indefinite, not representable — one of the arguments that make it so);
* ``"correct"`` — a finite result of the right shape and a float dtype that
  agrees with a dense reference computed independently of kronlin in extended
  precision (``np.longdouble``; solves and decompositions in float64 on
  power-of-two-scaled matrices), within a tolerance that scales with the
  dtype's eps, the order and the condition number;
* ``"other"`` — anything else: another exception type, a message that does
  not name the argument, a non-finite, mis-shaped or wrong result, an error on
  a well-posed input.  The test requires none.

NumPy's ``RuntimeWarning`` on the way to an overflow is not an outcome: what
the call ends in is.  Crashes (a signal) are caught by running this module in
a subprocess (``tests/test_badinput.py``, ``bench/badinput_matrix.py``), which
prints the call it is about to make before making it.

    python tests/badinput.py --examples 40 [--groups kron,stein] [--strict]

prints one JSON object: counts per entry point and outcome, and the first
``"other"`` cases.  Only public names of kronlin are used.
"""

from __future__ import annotations

import importlib.util

import argparse
import json
import math
import re
import sys
import warnings
from collections import Counter, defaultdict

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kronlin

LinAlgError = np.linalg.LinAlgError
CLEAR = (ValueError, TypeError, LinAlgError, FloatingPointError)
LD = np.longdouble
RHS_NAMES = ("X", "U", "V", "V_list", "x")  # a right-hand side may also be called "the right-hand side"/"vector"


# -- calls and their outcomes --------------------------------------------------------------------------------
class IllPosed(Exception):
    """Raised by a reference: the problem has no (representable) answer; an error naming one of ``names`` is right."""

    def __init__(self, *names):
        super().__init__(", ".join(names))
        self.names = names


class Either(IllPosed):
    """The problem lies where kronlin's documented policy may refuse it or answer it (a solve too ill-conditioned
    for the reference to answer to working accuracy, a contraction too slow for it to call safe): a clear error
    naming one of ``names`` is right, and so is a result that passes ``judge(out) -> (ok, detail)``, or that
    agrees with ``want = (expected, bound)``."""

    def __init__(self, *names, want=None, judge=None):
        super().__init__(*names)
        self.want, self.judge = want, judge


class Call:
    """One call: ``fn()`` runs kronlin, ``ref()`` returns ``(expected, bound)`` or raises :class:`IllPosed`."""

    def __init__(self, entry, label, fn, ref, bad, eps):
        self.entry, self.label, self.fn, self.ref, self.bad, self.eps = entry, label, fn, ref, dict(bad), eps

    def describe(self):
        return f"{self.label} bad={self.bad}"


def _names(msg: str, names) -> bool:
    for name in names:
        base = re.escape(name.split("[")[0])
        if re.search(rf"(?<![A-Za-z0-9_]){base}(?![A-Za-z_])", msg):
            return True
        if name in RHS_NAMES and re.search(r"right-hand side|vector|matrix of shape|\bthe (vector|matrix)\b", msg):
            return True
    return False


def _flat(out):
    if type(out).__module__.startswith("torch"):
        return [out.numpy()]
    if isinstance(out, dict):
        return [x for k in sorted(out) for x in _flat(out[k])]
    if isinstance(out, (list, tuple)):
        return [x for o in out for x in _flat(o)]
    return [out]


def classify(call: Call):
    """``("error" | "correct" | "other", detail)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's overflow warnings are not the outcome
        try:
            out = call.fn()
            exc = None
        except CLEAR as e:
            exc = e
        except Exception as e:  # noqa: BLE001 - anything else is the finding
            return "other", f"{type(e).__name__}: {e}"
        try:
            ref = call.ref()
            ill = None
        except IllPosed as e:
            ref, ill = None, e
        except Exception as e:  # noqa: BLE001 - the reference cannot be formed: the inputs are not a problem
            ref, ill = None, IllPosed(*call.bad)
            if not call.bad:
                return "other", f"reference failed on a well-posed input: {type(e).__name__}: {e}"
    if exc is not None:
        msg = str(exc)
        valid = {name for name, how in call.bad.items() if how.split(":")[-1] in LAYOUTS}  # must not be refused
        allowed = (set(call.bad) - valid) | (set(ill.names) if ill else set())
        if not allowed:
            return "other", f"error on a well-posed input: {type(exc).__name__}: {msg}"
        if _names(msg, allowed):
            return "error", None
        return "other", f"{type(exc).__name__} does not name {sorted(allowed)}: {msg}"
    if isinstance(ill, Either) and ill.judge is not None:
        ok, detail = ill.judge(out)
        return ("correct", None) if ok else ("other", detail)
    if isinstance(ill, Either) and ill.want is not None:
        ref, ill = ill.want, None
    if ill is not None:
        return "other", f"a result for an ill-posed problem ({ill}): {str(_flat(out)[0])[:80]}"
    got, (want, bound) = _flat(out), ref
    want, bound = _flat(want), _flat(bound)
    if len(got) != len(want):
        return "other", f"{len(got)} results, expected {len(want)}"
    for g, w, b in zip(got, want, bound):
        if not isinstance(g, (np.ndarray, np.floating)) or g.dtype not in (np.float32, np.float64):
            return "other", f"result of type {type(g).__name__} {getattr(g, 'dtype', '')}"
        w, b = np.asarray(w, LD), np.asarray(b, LD)
        stacked = any(h in ("batch2", "add_dim", "nested", "item:add_dim", "item:batch2") for h in call.bad.values())
        if stacked and g.shape != w.shape and g.shape[g.ndim - w.ndim:] == w.shape:
            w, b = np.broadcast_to(w, g.shape), np.broadcast_to(b, g.shape)  # a stack of identical problems
        if g.shape != w.shape:
            return "other", f"result of shape {g.shape}, expected {w.shape}"
        if not np.isfinite(g).all():
            return "other", "a non-finite result"
        atol = 1e3 * w.size * float(np.finfo(g.dtype).tiny)  # results that underflow (to zero or subnormals)
        if not np.all(np.abs(np.asarray(g, LD) - w) <= b + atol):
            err = float(np.max(np.abs(np.asarray(g, LD) - w)))
            return "other", f"wrong result: max error {err:.3g}, allowed {float(np.max(b)):.3g}"
    return "correct", None


# -- dense references in extended precision --------------------------------------------------------------------
def ld(x):
    return np.asarray(x, dtype=LD)


def _split(M):
    """``M = m · 2**e`` with ``max|m|`` in [1, 2): ``m`` in float64 (exact unless subnormal)."""
    m = np.max(np.abs(M)) if M.size else LD(0)  # in long double: 1e-600 is not 0
    e = 0 if m == 0 else int(np.floor(np.log2(m)))
    return np.asarray(M / LD(2) ** e, np.float64), e


def ld_solve(K, b):
    Km, ek = _split(K)
    bm, eb = _split(b)
    if np.linalg.cond(Km) > 1e14:
        raise IllPosed("A", "B", "G", "damping")
    return ld(np.linalg.solve(Km, bm)) * LD(2) ** (eb - ek)


def ld_inv(K):
    Km, e = _split(K)
    return ld(np.linalg.inv(Km)) * LD(2) ** (-e)


def cond(K):
    Km, _ = _split(K)
    return float(np.linalg.cond(Km)) if Km.size else 1.0


def ld_slogdet(K):
    Km, e = _split(K)
    s, l = np.linalg.slogdet(Km)
    return s, LD(l) + K.shape[0] * e * LD(math.log(2))


def kron(A, B):
    return np.kron(ld(A), ld(B))


def vecF(X):
    X = ld(X)
    return np.reshape(np.swapaxes(X, -1, -2), X.shape[:-2] + (-1,))


def unvecF(v, q, p):
    return np.swapaxes(np.reshape(v, v.shape[:-1] + (p, q)), -1, -2)


def product_bound(K, x, n, eps, c=10.0):
    """Elementwise rounding bound of ``K @ x`` computed by GEMMs: ``c·n·eps·(|K| |x|)``."""
    return c * n * eps * (np.abs(K) @ np.abs(x))


def solve_bound(K, y, eps, c=10.0):
    """Normwise bound of a backward-stable solve: ``c·n·eps·cond(K)·max|y|``."""
    return c * K.shape[0] * eps * cond(K) * np.max(np.abs(y)) + 0 * y


def fmax(eps):
    """The largest value of the dtype whose eps is ``eps``."""
    return float(np.finfo(np.float32 if eps > 1e-10 else np.float64).max)


def representable(y, eps):
    big = fmax(eps)
    if not np.all(np.isfinite(y)) or np.max(np.abs(y), initial=0) >= big:
        return False
    return True


# -- well-posed inputs ---------------------------------------------------------------------------------------------
def spd(rng, n, cond_=10.0):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.geomspace(1.0, cond_, n) if n > 1 else np.ones(1)
    M = (Q * w) @ Q.T
    return (M + M.T) / 2


def general(rng, n):
    return rng.standard_normal((n, n)) + 3 * np.sqrt(n) * np.eye(n)


SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


# -- bad values ----------------------------------------------------------------------------------------------------
def _huge(dtype):
    return (1e18, 1e35) if dtype == "float32" else (1e150, 1e300)


def _tiny(dtype):
    return (1e-18, 1e-40) if dtype == "float32" else (1e-150, 1e-310)


#: valid arrays in layouts the compiled code does not read directly: a call must give the correct result (an
#: error naming the argument is an "other" outcome here).  A sweep of the public names over these layouts
#: (2026-11-27) found an eigenbasis of byte-swapped factors refusing native ones in ``refresh`` and two kernel
#: dispatchers sending byte-swapped arrays to compiled code that refused them (tests/test_refresh.py,
#: tests/test_kernels.py); the matrix keeps every entry point honest about them.
LAYOUTS = ("byteswap", "unaligned", "fortran", "strided", "subclass", "readonly")

ARRAY_BAD = ("none", "str", "scalar", "ragged", "nested_ok", "bool", "int", "complex", "float16", "object", "add_dim",
             "batch2", "drop_dim", "shape", "nan", "inf", "empty", "huge", "tiny", "nonsquare", "nonsym", "indefinite",
             "singular", "torch") + LAYOUTS


class Subclass(np.ndarray):
    """An ndarray subclass with nothing of its own (a valid array that is not ``numpy.ndarray`` itself)."""


def layout(how: str, x: np.ndarray) -> np.ndarray:
    """``x``'s values in the layout ``how`` (one of :data:`LAYOUTS`)."""
    if how == "byteswap":
        return x.astype(x.dtype.newbyteorder())
    if how == "unaligned":  # one byte off the dtype's alignment, as a packed record's field or an odd offset
        raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
        y = np.frombuffer(raw.data, dtype=x.dtype, count=x.size, offset=1).reshape(x.shape)
        y[...] = x
        return y
    if how == "fortran":
        return np.asfortranarray(x)
    if how == "strided":
        return np.repeat(x, 2, axis=-1)[..., ::2] if x.ndim else x.copy()
    if how == "subclass":
        return x.copy().view(Subclass)
    if how == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    raise AssertionError(how)


def bad_array(draw, x, dtype, kinds=ARRAY_BAD):
    """A bad (or oddly typed but valid) replacement for the array ``x``."""
    how = draw(st.sampled_from(kinds))
    x = np.asarray(x)
    if how == "none":
        return how, None
    if how == "str":
        return how, draw(st.sampled_from(["abc", "", "1.0"]))
    if how == "scalar":
        return how, draw(st.sampled_from([3.0, 0, True, 1j]))
    if how == "ragged":
        return how, [[1.0, 2.0], [3.0]]
    if how == "nested_ok":
        return how, x.tolist()
    if how == "bool":
        return how, x > 0
    if how == "int":
        return how, np.round(x * 3).astype(np.int64)
    if how == "complex":
        return how, x.astype(np.complex128)
    if how == "float16":
        return how, x.astype(np.float16)
    if how == "object":
        return how, x.astype(object)
    if how == "add_dim":
        return how, x[None]
    if how == "batch2":
        return how, np.stack([x, x])
    if how == "drop_dim":
        return how, x[..., 0] if x.ndim else x
    if how == "shape":
        return how, np.concatenate([x, x[..., :1]], axis=-1) if x.ndim else np.ones(3)
    if how in ("nan", "inf"):
        y = x.astype(np.float64 if x.dtype.kind != "f" else x.dtype).copy()
        if y.size:
            y.flat[draw(st.integers(0, y.size - 1))] = np.nan if how == "nan" else -np.inf
        return how, y
    if how == "empty":
        return how, np.zeros(tuple(0 for _ in x.shape) or (0,), dtype)
    if how == "huge":
        return how, (x * draw(st.sampled_from(_huge(dtype)))).astype(dtype)
    if how == "tiny":
        return how, (x * draw(st.sampled_from(_tiny(dtype)))).astype(dtype)
    if how == "nonsquare":
        return how, x[..., :-1, :] if x.ndim >= 2 and x.shape[-2] > 1 else np.ones((2, 3), dtype)
    if how == "nonsym":
        y = x.copy()
        if y.ndim >= 2 and y.shape[-1] > 1:
            y[..., 0, -1] += 0.5 * (1 + abs(float(y[..., 0, -1].max())))
        return how, y
    if how == "indefinite":
        if x.ndim >= 2 and x.shape[-1] == x.shape[-2]:
            return how, (x - (np.abs(x).sum(-1).max() + 1) * np.eye(x.shape[-1])).astype(dtype)
        return how, -x
    if how == "singular":
        if x.ndim >= 2 and x.shape[-1] == x.shape[-2]:
            y = x.astype(np.float64).copy()
            y[..., :, 0] = 0
            y[..., 0, :] = 0
            return how, y.astype(dtype)
        return how, 0 * x
    if how == "torch":
        import torch

        return how, torch.as_tensor(np.ascontiguousarray(x))
    if how in LAYOUTS:
        return how, layout(how, x)
    raise AssertionError(how)


def bad_list(draw, xs, dtype):
    """A bad replacement for a per-layer list of arrays ``xs``."""
    how = draw(st.sampled_from(("none", "str", "scalar", "array", "empty", "short", "long", "item", "tuple_ok",
                                "nested")))
    if len(xs) == 0 and how in ("array", "short", "long", "item", "nested"):
        return "long", [np.eye(2, dtype=dtype)]
    if how == "none":
        return how, None
    if how == "str":
        return how, "abc"
    if how == "scalar":
        return how, 1.0
    if how == "array":
        return how, np.asarray(xs[0])
    if how == "empty":
        return how, []
    if how == "short":
        return how, list(xs[:-1])
    if how == "long":
        return how, list(xs) + [xs[-1]]
    if how == "tuple_ok":
        return how, tuple(xs)
    if how == "nested":
        return how, [list(xs)]
    k = draw(st.integers(0, len(xs) - 1))
    kind, v = bad_array(draw, xs[k], dtype)
    return f"item:{kind}", list(xs[:k]) + [v] + list(xs[k + 1:])


SCALAR_BAD = (None, "1.0", True, -1.0, float("nan"), float("inf"), -float("inf"), 1e300, 5e-324, 0.0, 1j,
              np.array([1.0, 2.0]), [1.0], np.float32(0.5), 2, np.array(0.25))


def bad_scalar(draw):
    v = draw(st.sampled_from(SCALAR_BAD))
    return repr(v)[:20], v


def bad_choice(draw):
    v = draw(st.sampled_from((None, "bogus", "", "EIG", "Trace", 1, 2.0, True, ["eig"])))
    return repr(v), v


def bad_flag(draw):
    v = draw(st.sampled_from((None, "no", "yes", 1, 0, 2.5, np.bool_(True), [True])))
    return repr(v), v


class Args:
    """Well-posed arguments by name, and which were replaced (name -> how)."""

    def __init__(self, draw, values: dict, kinds: dict, dtype: str, n_bad=None):
        self.v, self.bad = dict(values), {}
        names = [k for k in kinds if kinds[k] is not None]
        n = draw(st.sampled_from((0, 0, 1, 1, 1, 1, 2))) if n_bad is None else n_bad
        for name in draw(st.permutations(names))[: min(n, len(names))]:
            kind = kinds[name]
            if kind == "array":
                how, val = bad_array(draw, values[name], dtype)
            elif isinstance(kind, tuple):
                how, val = bad_array(draw, values[name], dtype, kind)
            elif kind == "list":
                how, val = bad_list(draw, values[name], dtype)
            elif kind == "scalar":
                how, val = bad_scalar(draw)
            elif kind == "choice":
                how, val = bad_choice(draw)
            elif kind == "flag":
                how, val = bad_flag(draw)
            else:
                how, val = kind(draw)
            self.v[name] = val
            self.bad[name] = how

    def __getitem__(self, k):
        return self.v[k]


def num(x, name):
    """A reference's view of an argument as an extended-precision array (anything else: the input is bad)."""
    if x is None or isinstance(x, (str, bytes)):
        raise IllPosed(name)
    if type(x).__module__.startswith("torch"):
        x = x.numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "biuf" or a.dtype == np.float16:
        raise IllPosed(name)
    return a.astype(LD)


def scal(x, name, lo=None, positive=False):
    if isinstance(x, (bool, np.bool_, str, bytes)) or x is None:
        raise IllPosed(name)
    a = np.asarray(x)
    if a.ndim or a.dtype.kind not in "iuf":
        raise IllPosed(name)
    v = float(a)
    if not math.isfinite(v) or (lo is not None and v < lo) or (positive and v <= 0):
        raise IllPosed(name)
    return v


def unstack(M, nd=2):
    """A stack of identical matrices (a ``batch2``/``add_dim`` replacement) as the one matrix (``nd``: 1 for vectors)."""
    while M.ndim > nd and M.shape[0] >= 1 and all(np.array_equal(M[0], m) for m in M):
        M = M[0]
    return M


def square(M, name, n=None):
    M = unstack(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0 or (n is not None and M.shape[0] != n):
        raise IllPosed(name)
    if not np.all(np.isfinite(M)):
        raise IllPosed(name)
    return M


def rhs(X, name, q, p):
    """A right-hand side in matrix form ``(..., q, p)`` and a function bringing results back to ``X``'s format."""
    X = num(X, name)
    if not np.all(np.isfinite(X)):
        raise IllPosed(name)
    if X.ndim >= 2 and X.shape[-2:] == (q, p):
        return X, lambda Y: Y
    if X.ndim >= 1 and X.shape[-1] == p * q:
        return unvecF(X, q, p), vecF
    raise IllPosed(name)


def linop_rhs(x, q, p):
    """A vector handed to a LinearOperator as a ``(1, q, p)`` block, and the function back to a flat vector."""
    x = num(x, "x")
    # SciPy's LinearOperator.matvec takes (n,) or (n, 1) and answers in the same shape
    if x.shape not in ((p * q,), (p * q, 1)) or not np.all(np.isfinite(x)):
        raise IllPosed("x")
    shape = x.shape
    return unvecF(x.reshape(1, -1), q, p), lambda Y: vecF(Y)[0].reshape(shape)


def eps_of(dtype):
    return float(np.finfo(dtype).eps)


def ceps(*values):
    """eps of the dtype kronlin computes in: float32 when every array argument is float32, else float64."""
    def f32(v):
        if isinstance(v, (list, tuple)):
            return all(f32(x) for x in v)
        dt = getattr(v, "dtype", "")
        if isinstance(dt, np.dtype):  # either byte order
            return dt.kind == "f" and dt.itemsize == 4
        return str(dt).split(".")[-1] == "float32"  # torch.float32
    return eps_of("float32" if all(f32(v) for v in values if v is not None and not callable(v)) else "float64")


# -- entry points ----------------------------------------------------------------------------------------------------
def _rhs_value(draw, rng, q, p, dtype):
    form = draw(st.sampled_from(("matrix", "flat", "batch")))
    X = rng.standard_normal((q, p)).astype(dtype)
    if form == "flat":
        return np.asarray(vecF(X), dtype)
    if form == "batch":
        return np.stack([X, 2 * X])
    return X


def _operands(draw, dtype, symmetric):
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    p, q = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if symmetric:
        A, G = spd(rng, p, 10 ** draw(st.floats(0, 2))), spd(rng, q, 10 ** draw(st.floats(0, 2)))
    else:
        A, G = general(rng, p), general(rng, q)
    return rng, p, q, A.astype(dtype), G.astype(dtype)


def _kron_ref(a, nameA="A", nameG="G"):
    A = square(num(a["A"], nameA), nameA)
    G = square(num(a["G"], nameG), nameG)
    return A, G, kron(A, G)


def _matvec_ref(K, x, eps, transpose=False, rep_eps=None):
    """``K x`` for rows ``x`` (..., n) and its rounding bound (``rep_eps``: of the result's dtype, if wider)."""
    K = K.T if transpose else K
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ K.T
    if not representable(y, eps if rep_eps is None else rep_eps):
        raise IllPosed("A", "G", "X", "x")
    return y.reshape(x.shape), product_bound(K, x2.T, K.shape[0], eps).T.reshape(x.shape)


def _inf_norm(M):
    return np.max(np.sum(np.abs(M), axis=-1)) if M.size else LD(0)


def _backward_judge(K, Kabs, x, to_rows, eps):
    """A judge (see :class:`Either`) of a solve ``K y = x`` (rows ``x`` (..., n)): its componentwise backward
    error (Oettli–Prager) ``max_i |K y − x|_i / (Kabs |y| + |x|)_i``, in extended precision, at most
    ``100·n·eps`` (``Kabs`` bounds the data the operator was formed from entrywise, ``to_rows`` turns a result
    into rows or raises :class:`IllPosed`).  Componentwise, not normwise: a huge component along a nearly
    singular direction must not hide an error in the well-determined ones."""
    n = K.shape[0]

    def judge(out):
        if not isinstance(out, np.ndarray) or out.dtype not in (np.float32, np.float64):
            return False, f"result of type {type(out).__name__} {getattr(out, 'dtype', '')}"
        try:
            y = to_rows(out)
        except IllPosed:
            return False, f"result of shape {out.shape}"
        if y.shape != x.shape:
            return False, f"result of shape {out.shape}"
        if not np.all(np.isfinite(y)):
            return False, "a non-finite result"
        r = np.abs(y @ K.T - x)
        scale = np.abs(y) @ Kabs.T + np.abs(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            omega = float(np.max(np.where(scale > 0, r / scale, np.where(r > 0, np.inf, 0))))
        if omega <= 100 * n * eps:
            return True, None
        return False, f"componentwise backward error {omega:.3g} of an ill-conditioned solve, allowed {100 * n * eps:.3g}"

    return judge


def _solve_ref(K, x, eps, names=("A", "G")):
    """``K⁻¹ x`` for rows ``x`` (..., n) and its bound."""
    x2 = x.reshape(-1, x.shape[-1])
    if not representable(x2 @ ld_inv(K).T, eps):
        raise IllPosed(*names, "X", "x")
    y = np.stack([ld_solve(K, xi) for xi in x2]).reshape(x.shape)
    return y, solve_bound(K, y, eps)


@st.composite
def kron_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    eps = eps_of(dtype)
    symmetric = draw(st.booleans())
    rng, p, q, A, G = _operands(draw, dtype, symmetric)
    method = draw(st.sampled_from(("@", "matvec", "solve", "inv", "logdet", "slogdet", "trace", "to_dense", "T@",
                                   "matmat", "rmatmat", "linop.matvec", "linop.rmatvec", "linop.matmat", "A")))
    vals = {"A": A, "G": G, "X": _rhs_value(draw, rng, q, p, dtype), "V": rng.standard_normal((p * q, 2)),
            "x": rng.standard_normal(p * q)}
    uses = {"@": "X", "matvec": "X", "solve": "X", "T@": "X", "matmat": "V", "rmatmat": "V", "linop.matvec": "x",
            "linop.rmatvec": "x", "linop.matmat": "V"}
    kinds = {"A": "array", "G": "array", "X": None, "V": None, "x": None}
    if method in uses:
        kinds[uses[method]] = "array"
    a = Args(draw, vals, kinds, dtype)

    def fn():
        K = kronlin.Kron(a["A"], a["G"])
        if method in ("@", "matvec", "solve"):
            return getattr(K, {"@": "__matmul__"}.get(method, method))(a["X"])
        if method == "T@":
            return K.T @ a["X"]
        if method in ("matmat", "rmatmat"):
            return getattr(K, method)(a["V"])
        if method.startswith("linop."):
            return getattr(K.aslinearoperator(), method[6:])(a["V"] if method == "linop.matmat" else a["x"])
        if method == "inv":
            return K.inv().to_dense()
        if method == "A":
            return K.A
        return getattr(K, method)()

    def ref():
        # a LinearOperator casts its vectors to the operator's dtype; matmat promotes like the operator's methods
        eps = ceps(a["A"], a["G"])  # the operator's precision (a float64 right-hand side does not refine its factors)
        A, G, K = _kron_ref(a)
        n = K.shape[0]
        if method in ("@", "matvec", "solve", "T@"):
            X, back = rhs(a["X"], "X", G.shape[0], A.shape[0])
            x = vecF(X)
            y, b = _solve_ref(K, x, eps) if method == "solve" else _matvec_ref(K, x, eps, method == "T@")
            return back(unvecF(y, G.shape[0], A.shape[0])), back(unvecF(b, G.shape[0], A.shape[0]))
        if method in ("matmat", "rmatmat", "linop.matvec", "linop.rmatvec", "linop.matmat"):
            name = "V" if method.endswith("matmat") else "x"
            V = num(a[name], name)
            # SciPy's LinearOperator.matvec/rmatvec also take (n, 1) and answer in that shape
            column = method.startswith("linop.") and name == "x" and V.shape == (n, 1)
            if column:
                V = V[:, 0]
            if V.shape[0] != n or V.ndim != (2 if name == "V" else 1) or not np.all(np.isfinite(V)):
                raise IllPosed(name)
            y, b = _matvec_ref(K, V.T if V.ndim == 2 else V[None], eps, "rmat" in method)
            if column:
                return y[0][:, None], b[0][:, None]
            return (y.T, b.T) if V.ndim == 2 else (y[0], b[0])
        if method == "inv":
            Ki = ld_inv(K)
            if cond(K) > 1 / (10 * eps) or not representable(Ki, eps):
                raise IllPosed("A", "G")
            return Ki, 10 * n * eps * cond(K) * np.max(np.abs(Ki)) + 0 * Ki
        if method in ("logdet", "slogdet"):
            if cond(K) > 1 / (10 * eps):
                raise IllPosed("A", "G")
            s, l = ld_slogdet(K)
            if method == "logdet" and s <= 0:
                raise IllPosed("A", "G")
            bound = 10 * n * eps * (cond(K) + abs(float(l)))
            return ((ld(s), l), (ld(0), bound)) if method == "slogdet" else (l, bound)
        if method == "trace":
            t = np.trace(A) * np.trace(G)
            if not representable(t, eps):
                raise IllPosed("A", "G")
            return t, 10 * n * eps * np.sum(np.abs(np.diag(A))) * np.sum(np.abs(np.diag(G)))
        if method == "to_dense":
            if not representable(K, eps):
                raise IllPosed("A", "G")
            return K, 2 * eps * np.abs(K)
        return A, 0 * A  # accessor

    return Call("Kron", f"Kron.{method}", fn, ref, a.bad, eps)


@st.composite
def kron_eigh_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    eps = eps_of(dtype)
    rng, p, q, A, G = _operands(draw, dtype, True)
    method = draw(st.sampled_from(("solve", "power", "apply", "@", "eigvals", "logdet", "linop", "KronEigh",
                                   "from_rows")))
    vals = {"A": A, "G": G, "X": _rhs_value(draw, rng, q, p, dtype), "damping": draw(st.sampled_from((0.0, 1e-3, 1.0))),
            "power": draw(st.sampled_from((-1.0, -0.5, -0.25, 2.0, 1.0))), "fn": lambda d: 1.0 / (d + 1.0),
            "psd": True, "x": rng.standard_normal(p * q)}
    kinds = {"A": "array", "G": "array", "X": None, "damping": None, "power": None, "fn": None, "psd": "flag", "x": None}
    if method in ("solve", "power", "apply", "@"):
        kinds["X"] = "array"
    if method in ("solve", "power", "eigvals", "logdet", "linop", "from_rows"):
        kinds["damping"] = "scalar"
    if method == "from_rows":
        kinds["X"] = "array"
    if method in ("power", "linop"):
        kinds["power"] = "scalar"
    if method == "apply":
        kinds["fn"] = lambda draw: ("fn", draw(st.sampled_from((None, "sqrt", 3.0, lambda d: None, lambda d: "x",
                                                                lambda d: d[..., :1, :1] * 0 + np.nan,
                                                                lambda d: np.ones((7, 7)), lambda d: d + 1j))))
    if method == "linop":
        kinds["x"] = "array"
    a = Args(draw, vals, kinds, dtype)
    if method == "KronEigh":  # the constructor from an eigenbasis, mutated there
        la, Qa = np.linalg.eigh(A.astype(np.float64))
        lg, Qg = np.linalg.eigh(G.astype(np.float64))
        b = Args(draw, {"Qa": Qa.astype(dtype), "la": la.astype(dtype), "Qg": Qg.astype(dtype), "lg": lg.astype(dtype)},
                 {"Qa": "array", "la": "array", "Qg": "array", "lg": "array"}, dtype)
    else:
        b = None
    c = None
    if method == "from_rows":  # the constructor from rows: A = s_a·aᵀa + shift_a·I (thin when fewer rows than p)
        na, ng = draw(st.integers(1, 2 * p)), draw(st.integers(1, 2 * q))
        c = Args(draw, {"a": rng.standard_normal((na, p)).astype(dtype), "g": rng.standard_normal((ng, q)).astype(dtype),
                        "scale_a": draw(st.sampled_from((1.0, 0.25))), "scale_g": 2.0,
                        "shift_a": draw(st.sampled_from((0.0, 0.1))), "shift_g": draw(st.sampled_from((0.0, 0.3)))},
                 {"a": "array", "g": "array", "scale_a": "scalar", "scale_g": "scalar", "shift_a": "scalar",
                  "shift_g": "scalar"}, dtype)

    def operator():
        if c is not None:
            return kronlin.KronEigh.from_rows(c["a"], c["g"], c["scale_a"], c["scale_g"], c["shift_a"], c["shift_g"])
        if b is not None:
            return kronlin.KronEigh(b["Qa"], b["la"], b["Qg"], b["lg"])
        return kronlin.Kron(a["A"], a["G"]).eigh(psd=a["psd"])

    def fn():
        E = operator()
        if method == "solve":
            return E.solve(a["X"], a["damping"])
        if method == "power":
            return E.power(a["X"], a["power"], damping=a["damping"])
        if method == "apply":
            return E.apply(a["X"], a["fn"])
        if method == "@":
            return E @ a["X"]
        if method == "eigvals":
            return E.eigvals(a["damping"])
        if method == "logdet":
            return E.logdet(a["damping"])
        if method == "linop":
            return E.aslinearoperator(a["power"], a["damping"]).matvec(a["x"])
        if method == "from_rows":
            return E.solve(a["X"], a["damping"])
        return E.solve(a["X"])

    def ref():
        # eigenvectors are as accurate as their own dtype, whatever the others promote the computation to
        eps = max(ceps(*[b[k] for k in ("Qa", "la", "Qg", "lg")]), ceps(b["Qa"]), ceps(b["Qg"])) if b is not None else ceps(a["A"], a["G"])
        if c is not None:
            eps = ceps(c["a"], c["g"])
            sa, sg = scal(c["scale_a"], "scale_a", positive=True), scal(c["scale_g"], "scale_g", positive=True)
            ha, hg = scal(c["shift_a"], "shift_a", lo=0), scal(c["shift_g"], "shift_g", lo=0)
            fac = []
            for nm, s_, h_ in (("a", sa, ha), ("g", sg, hg)):
                R = unstack(num(c[nm], nm))
                if R.ndim != 2 or not R.size or not np.all(np.isfinite(R)) or 0 < np.max(np.abs(R)) < np.finfo(np.float64).tiny:
                    raise IllPosed(nm)  # zero rows are fine (A = shift·I): subnormal ones are refused
                M = LD(s_) * (R.T @ R) + LD(h_) * np.eye(R.shape[1], dtype=LD)
                if not representable(M, eps):
                    raise IllPosed(nm, "scale_" + nm)
                fac.append(M)
            A, G = fac
            names = ("a", "g", "scale_a", "scale_g", "shift_a", "shift_g")
        elif b is not None:
            Qa, Qg, la, lg = (unstack(num(b[k], k), 2 if k[0] == "Q" else 1) for k in ("Qa", "Qg", "la", "lg"))
            for Q, w, nq, nw in ((Qa, la, "Qa", "la"), (Qg, lg, "Qg", "lg")):
                if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or w.shape != (Q.shape[0],) or not Q.size:
                    raise IllPosed(nq, nw)
                if not (np.all(np.isfinite(Q)) and np.all(np.isfinite(w))):
                    raise IllPosed(nq, nw)
                if np.max(np.abs(Q.T @ Q - np.eye(Q.shape[0]))) > 100 * Q.shape[0] * ceps(b[nq]):
                    raise IllPosed(nq)
            A, G = (Qa * la) @ Qa.T, (Qg * lg) @ Qg.T
            names = ("la", "lg", "Qa", "Qg")
        else:
            A, G = square(num(a["A"], "A"), "A"), square(num(a["G"], "G"), "G")
            if np.max(np.abs(A - A.T)) > 1000 * eps * np.max(np.abs(A)) or np.max(np.abs(G - G.T)) > 1000 * eps * np.max(np.abs(G)):
                raise IllPosed("A", "G")
            if not isinstance(a["psd"], (bool, np.bool_)):
                raise IllPosed("psd")
            names = ("A", "G")
        q, p = G.shape[0], A.shape[0]
        K = kron(A, G)
        n = K.shape[0]
        wK = np.linalg.eigvalsh(_split(K)[0]) * LD(2) ** _split(K)[1]
        if b is None and a["psd"] and (np.min(np.linalg.eigvalsh(_split(A)[0])) < -p * eps or np.min(np.linalg.eigvalsh(_split(G)[0])) < -q * eps):
            raise IllPosed("A", "G")
        if np.max(np.abs(wK)) > fmax(eps) / 8:
            raise IllPosed(*names)
        d = scal(a["damping"], "damping", lo=0) if kinds["damping"] or method in ("solve", "power") else 0.0
        if method == "KronEigh":
            d = 0.0
        Kd = K + LD(d) * np.eye(n, dtype=LD)
        if method == "eigvals":  # lg_i·la_j + damping, each factor's eigenvalues ascending (eigh's order)
            la = np.linalg.eigvalsh(_split(A)[0]) * LD(2) ** _split(A)[1]
            lg = np.linalg.eigvalsh(_split(G)[0]) * LD(2) ** _split(G)[1]
            w = lg[:, None] * la[None, :] + LD(d)
            return w, 10 * n * eps * np.max(np.abs(w)) + 0 * w
        if method == "logdet":
            if np.min(wK + LD(d)) <= 10 * eps * (2 * np.max(np.abs(wK)) + d):
                raise IllPosed(*names, "damping")
            l = np.sum(np.log(wK + LD(d)))
            return l, 10 * n * eps * (cond(Kd) + abs(float(l)))
        if method == "linop":
            X, back = linop_rhs(a["x"], q, p)
        else:
            X, back = rhs(a["X"], "X", q, p)
        x = vecF(X)
        power = -1.0 if method in ("solve", "KronEigh", "from_rows") else 1.0
        if method in ("power", "linop"):
            power = scal(a["power"], "power")
        if method == "apply":
            f = a["fn"]
            if not callable(f):
                raise IllPosed("fn")
            w, Q = np.linalg.eigh(_split(K)[0])
            w = ld(w) * LD(2) ** _split(K)[1]
            s = f(np.asarray(w, np.float64))
            if not (isinstance(s, np.ndarray) and s.shape == w.shape and s.dtype.kind == "f" and np.all(np.isfinite(s))):
                raise IllPosed("fn")
            y = x @ (ld(Q) * ld(s)) @ ld(Q).T
            return back(unvecF(y, q, p)), back(unvecF(10 * n * eps * cond(K + np.eye(n)) * np.max(np.abs(y)) + 0 * y, q, p))
        if power == 1.0:  # through the eigenbasis: a normwise bound, not GEMM's elementwise one
            y, _ = _matvec_ref(Kd, x, eps)
            bnd = 30 * n * eps * np.max(np.abs(wK) + LD(d)) * np.max(np.abs(x)) + 0 * y
            return back(unvecF(y, q, p)), back(unvecF(bnd, q, p))
        w = wK + LD(d)
        tol = 10 * eps * (2 * np.max(np.abs(wK)) + d)
        if c is not None and power < 0:
            # rows give factors of any conditioning: KronEigh's documented policy decides (a product of the two
            # spectra against its own rounding, |lg_i|·max|la| + |la_j|·max|lg|), under which a solve with
            # cond(A ⊗ G) near 1/eps is still accurate product by product
            la = np.linalg.eigvalsh(_split(A)[0]) * LD(2) ** _split(A)[1]
            lg = np.linalg.eigvalsh(_split(G)[0]) * LD(2) ** _split(G)[1]
            err = np.abs(lg)[:, None] * np.max(np.abs(la)) + np.abs(la)[None, :] * np.max(np.abs(lg)) + LD(d)
            if np.any(np.abs(lg[:, None] * la[None, :] + LD(d)) <= 10 * eps * err):  # the policy (_validate.singular_tol)
                raise IllPosed(*names, "damping", "power")
            w = np.where(np.abs(w) <= tol, tol, w)  # the bound below then stays finite
        elif (power != int(power) and np.min(w) < 0) or (power < 0 and np.min(np.abs(w)) <= tol):
            raise IllPosed(*names, "damping", "power")
        # w**power must be representable: a positive power of a zero (or tiny) eigenvalue is 0 (or underflows
        # harmlessly), so there only the largest counts
        logs = [abs(math.log(float(np.max(np.abs(w)))))] if power > 0 and np.max(np.abs(w)) > 0 else \
            [abs(math.log(float(np.max(np.abs(w))))), abs(math.log(float(max(np.min(np.abs(w)), 1e-4900))))]
        if abs(power) * max(logs) > math.log(fmax(eps)) - 2:
            raise IllPosed("power", *names)
        if np.array_equal(Kd, np.diag(np.diag(Kd))):  # diagonal (the identity): exact eigenvalues, any power
            wm, Q, e = np.diag(Kd), np.eye(n, dtype=LD), 0
        else:
            wm, Q = np.linalg.eigh(_split(Kd)[0])
            e = _split(Kd)[1]
        Q = ld(Q)
        wp = (ld(wm) * LD(2) ** e) ** LD(power)
        y = x @ (Q * wp) @ Q.T
        if not representable(y, eps):
            raise IllPosed(*names, "X", "power")
        if power > 0:  # normwise, as a product: a singular K (a zero eigenvalue) makes no condition number
            bound = 30 * n * eps * np.max(np.abs(w)) ** LD(power) * np.max(np.abs(x)) + 0 * y
        else:
            kappa = float(np.max(np.abs(w)) / np.min(np.abs(w)))
            bound = 30 * n * eps * max(kappa ** abs(power), 1.0) * np.max(np.abs(y)) + 0 * y
        return back(unvecF(y, q, p)), back(unvecF(bound, q, p))

    bad = dict(a.bad, **(b.bad if b is not None else {}), **(c.bad if c is not None else {}))
    return Call("KronEigh", f"KronEigh.{method}", fn, ref, bad, eps)


def _bad_pi(draw):
    return bad_choice(draw) if draw(st.booleans()) else bad_scalar(draw)


def _pi_ref(A, G, pi, names=("A", "G")):
    """π of factored damping from the dense factors (``pi`` a norm name or a number)."""
    p, q = A.shape[0], G.shape[0]
    if isinstance(pi, str):
        if pi == "trace":
            nA, nG = np.trace(A) / p, np.trace(G) / q
        elif pi == "fro":
            nA, nG = math.sqrt(q) * np.sqrt(np.sum(A * A)), math.sqrt(p) * np.sqrt(np.sum(G * G))
        elif pi == "spectral":
            nA, nG = (LD(np.linalg.norm(_split(M)[0], 2)) * LD(2) ** _split(M)[1] for M in (A, G))
        else:
            raise IllPosed("pi", "norm")
        if not (nA > 0 and nG > 0):
            raise IllPosed(*names)
        return np.sqrt(nA) / np.sqrt(nG)
    return LD(scal(pi, "pi", positive=True))


@st.composite
def damping_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    eps = eps_of(dtype)
    rng, p, q, A, G = _operands(draw, dtype, True)
    method = draw(st.sampled_from(("pi_factor", "factored_damping.solve", "factored_damping.@", "DampedKron.solve",
                                   "DampedKron.@", "DampedKron.to_dense", "DampedKron.linop")))
    vals = {"A": A, "G": G, "X": _rhs_value(draw, rng, q, p, dtype), "x": rng.standard_normal(p * q),
            "gamma": draw(st.sampled_from((0.0, 0.1, 1.0))), "damping": draw(st.sampled_from((0.0, 0.01, 1.0))),
            "pi": draw(st.sampled_from(("trace", "fro", "spectral", 0.5, 2.0))), "norm": "trace",
            "mode": draw(st.sampled_from(("exact", "factored")))}
    kinds = {"A": "array", "G": "array", "X": None, "x": None, "gamma": None, "damping": None, "pi": None,
             "norm": None, "mode": None}
    if method == "pi_factor":
        vals["norm"] = draw(st.sampled_from(("trace", "fro", "spectral")))
        kinds["norm"] = "choice"
    elif method.startswith("factored"):
        kinds.update(gamma="scalar", pi=_bad_pi,
                     X="array")
    else:
        kinds.update(damping="scalar", mode="choice", X="array" if method.endswith(("solve", "@")) else None,
                     x="array" if method == "DampedKron.linop" else None)
        if vals["mode"] == "factored":
            kinds["pi"] = _bad_pi
    a = Args(draw, vals, kinds, dtype)

    def fn():
        if method == "pi_factor":
            return np.float64(kronlin.pi_factor(a["A"], a["G"], a["norm"]))
        if method.startswith("factored"):
            K = kronlin.factored_damping(a["A"], a["G"], a["gamma"], pi=a["pi"])
            return K.solve(a["X"]) if method.endswith("solve") else K @ a["X"]
        D = kronlin.DampedKron(a["A"], a["G"], a["damping"], mode=a["mode"], pi=a["pi"])
        if method.endswith("linop"):
            return D.aslinearoperator().matvec(a["x"])
        if method.endswith("to_dense"):
            return D.to_dense()
        return D.solve(a["X"]) if method.endswith("solve") else D @ a["X"]

    def ref():
        eps = ceps(a["A"], a["G"])
        A, G = square(num(a["A"], "A"), "A"), square(num(a["G"], "G"), "G")
        p, q = A.shape[0], G.shape[0]
        if method == "pi_factor":
            if not isinstance(a["norm"], str) or a["norm"] not in ("trace", "fro", "spectral"):
                raise IllPosed("norm")
            v = _pi_ref(A, G, a["norm"])
            if not representable(v, 1e-16):
                raise IllPosed("A", "G")
            return v, 10 * (p + q) * eps * v
        if method.startswith("factored"):
            gamma, pi, names = scal(a["gamma"], "gamma", lo=0), a["pi"], ("gamma", "pi", "A", "G")
            exact = False
        else:
            lam = scal(a["damping"], "damping", lo=0)
            if a["mode"] not in ("exact", "factored"):
                raise IllPosed("mode")
            exact, gamma, pi, names = a["mode"] == "exact", math.sqrt(lam), a["pi"], ("damping", "pi", "A", "G")
        if exact:
            if np.max(np.abs(A - A.T)) > 1000 * eps * np.max(np.abs(A)) or np.max(np.abs(G - G.T)) > 1000 * eps * np.max(np.abs(G)):
                raise IllPosed("A", "G")
            K = kron(A, G) + LD(gamma) ** 2 * np.eye(p * q, dtype=LD)
            Kabs = kron(np.abs(A), np.abs(G)) + LD(gamma) ** 2 * np.eye(p * q, dtype=LD)
            if np.min(np.linalg.eigvalsh(_split(K)[0])) < -1e-8:
                raise IllPosed("A", "G")
        else:
            pv = _pi_ref(A, G, pi, ("A", "G", "pi")) if gamma > 0 else LD(1)
            if gamma > 0 and not (representable(pv * gamma, eps) and representable(gamma / pv, eps)):
                raise IllPosed(*names)
            Ad, Gd = A + pv * LD(gamma) * np.eye(p, dtype=LD), G + LD(gamma) / pv * np.eye(q, dtype=LD)
            if not (representable(Ad, eps) and representable(Gd, eps)):
                raise IllPosed(*names)
            K = kron(Ad, Gd)
            # forming A + πγI rounds relative to |A| + πγ (cancellation when A is indefinite)
            Kabs = kron(np.abs(A) + pv * LD(gamma) * np.eye(p, dtype=LD), np.abs(G) + LD(gamma) / pv * np.eye(q, dtype=LD))
        if method.endswith(("@", "to_dense")) and not representable(K, eps):
            raise IllPosed(*names)
        inverse = method.endswith(("solve", "linop"))
        if method.endswith("to_dense"):
            return K, 10 * eps * Kabs
        if method.endswith("linop"):
            X, back = linop_rhs(a["x"], q, p)
        else:
            X, back = rhs(a["X"], "X", q, p)
        x = vecF(X)
        growth = max(1.0, float(np.linalg.norm(_split(Kabs)[0], 2) * 2.0 ** (_split(Kabs)[1] - _split(K)[1])
                                / np.linalg.norm(_split(K)[0], 2)))
        if inverse and cond(K) > 1 / (10 * eps):  # the singularity policy, on the factors kronlin forms
            raise IllPosed(*names)
        if inverse:
            y, b = _solve_ref(K, x, eps, names)
            b = b * growth
        else:
            y, _ = _matvec_ref(K, x, eps)
            b = _matvec_ref(Kabs, np.abs(x), eps)[1]
        return back(unvecF(y, q, p)), back(unvecF(b, q, p))

    return Call("damping", method, fn, ref, a.bad, eps)


@st.composite
def stein_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    eps = eps_of(dtype)
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    p, q = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    method = draw(st.sampled_from(("auto", "eig", "schur", "smith")))
    sign = draw(st.sampled_from((1, -1)))
    symmetric = method in ("auto", "eig") or draw(st.booleans())
    A, B = (spd(rng, n, 10 ** draw(st.floats(0, 1.5))) if symmetric else general(rng, n) / np.sqrt(n) for n in (p, q))
    C, D = (spd(rng, n, 10 ** draw(st.floats(0, 1.5))) if symmetric else general(rng, n) / np.sqrt(n) for n in (p, q))
    if method == "smith" or sign == -1:  # contractive: ρ(B⁻¹D)·ρ(A⁻¹C) <= 0.25
        r = max(abs(np.linalg.eigvals(np.linalg.solve(A, C)))) * max(abs(np.linalg.eigvals(np.linalg.solve(B, D))))
        C = C * (0.25 / r)
    call = draw(st.sampled_from(("solve_kron_sum", "KronSumInverse.solve", "KronSumInverse.logdet",
                                 "KronSumInverse.operator_matmul", "KronSumInverse.T", "KronSumInverse.linop")))
    if call.endswith("logdet"):  # documented for method="eig" only (NotImplementedError otherwise)
        method = "eig"
    vals = {"A": A.astype(dtype), "B": B.astype(dtype), "C": C.astype(dtype), "D": D.astype(dtype),
            "V": _rhs_value(draw, rng, q, p, dtype), "x": rng.standard_normal(p * q), "sign": sign, "method": method,
            "tol": None, "max_iter": None}
    kinds = {k: "array" for k in "ABCD"}
    kinds.update(V=None if call.endswith(("logdet", "linop")) else "array", x="array" if call.endswith("linop") else None,
                 sign=lambda draw: ("sign", draw(st.sampled_from((0, 2, True, "+", None, 1.5, -1.0, np.int64(1))))),
                 method="choice", tol=None, max_iter=None)
    if method == "smith":
        kinds.update(tol="scalar", max_iter=lambda draw: ("max_iter", draw(st.sampled_from(
            (0, -1, 2.5, "10", None, float("nan"), True, np.int64(50), 10**9)))))
    a = Args(draw, vals, kinds, dtype)
    rhs_name = "U" if call.endswith("operator_matmul") else "V"  # operator_matmul(U), solve(V)

    def fn():
        opts = {k: a[k] for k in ("tol", "max_iter") if a[k] is not None or a.bad.get(k)}
        if call == "solve_kron_sum":
            return kronlin.solve_kron_sum(a["A"], a["B"], a["C"], a["D"], a["V"], sign=a["sign"], method=a["method"],
                                          **opts)
        S = kronlin.KronSumInverse(a["A"], a["B"], a["C"], a["D"], sign=a["sign"], method=a["method"], **opts)
        if call.endswith("logdet"):
            return S.logdet()
        if call.endswith("operator_matmul"):
            return S.operator_matmul(a["V"])
        if call.endswith(".T"):
            return S.T.solve(a["V"])
        if call.endswith("linop"):
            return S.aslinearoperator().matvec(a["x"])
        return S.solve(a["V"])

    def ref():
        eps = ceps(a["A"], a["B"], a["C"], a["D"])
        A, B = square(num(a["A"], "A"), "A"), square(num(a["B"], "B"), "B")
        C, D = square(num(a["C"], "C"), "C", A.shape[0]), square(num(a["D"], "D"), "D", B.shape[0])
        p, q = A.shape[0], B.shape[0]
        s = a["sign"]
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, float, np.integer, np.floating)) or s not in (1, -1):
            raise IllPosed("sign")
        m = a["method"]
        if not isinstance(m, str) or m not in ("auto", "eig", "schur", "smith"):
            raise IllPosed("method")
        if m != "smith" and (a["tol"] is not None or a["max_iter"] is not None):
            raise IllPosed("tol", "max_iter")
        tol = 0.0
        if m == "smith":
            if a["tol"] is not None:  # the user's stopping tolerance: the answer is as accurate as asked for
                tol = scal(a["tol"], "tol", positive=True)
            mi = a["max_iter"]
            if mi is not None and (isinstance(mi, (bool, np.bool_)) or not isinstance(mi, (int, np.integer)) or mi < 1):
                raise IllPosed("max_iter")
        names = ("A", "B", "C", "D")
        big = fmax(eps)
        for X, Y in ((A, B), (C, D)):
            if float(np.max(np.abs(X))) * float(np.max(np.abs(Y))) * max(p, q) >= big:
                raise IllPosed(*names)
        K = kron(A, B) + LD(s) * kron(C, D)
        n = p * q
        sym = all(np.max(np.abs(M - M.T)) <= 1000 * eps * np.max(np.abs(M)) for M in (A, B, C, D))
        if m == "eig" and not sym:
            raise IllPosed(*names)
        if m == "eig" or (m == "auto" and sym):
            for M, nm in ((A, "A"), (B, "B")):
                if np.min(np.linalg.eigvalsh(_split(M)[0])) <= 0:
                    if m == "eig":
                        raise IllPosed(nm, "method")
        grey = ()  # where kronlin's policy may refuse or answer (Either): the arguments an error may name
        if m == "smith":
            r = max(abs(np.linalg.eigvals(np.linalg.solve(_split(A)[0], _split(C)[0])))) * 2.0 ** (_split(C)[1] - _split(A)[1])
            r *= max(abs(np.linalg.eigvals(np.linalg.solve(_split(B)[0], _split(D)[0])))) * 2.0 ** (_split(D)[1] - _split(B)[1])
            if not r < 1.0 + 1e-6:  # the series diverges: kronlin's set-up refuses (its squarings stop shrinking)
                raise IllPosed(*names, "method")
            if not r < 0.99:  # converging slowly, or ρ = 1 to within the reference's rounding: either outcome
                grey = (*names, "method")
        ill_conditioned = cond(K) > 1 / (100 * eps)  # beyond the reference's accuracy, not necessarily kronlin's
        if ill_conditioned and call.endswith("logdet"):
            raise IllPosed(*names)
        if s == -1 and m == "eig" and np.min(np.linalg.eigvalsh(_split(K)[0])) <= 0:
            raise IllPosed(*names)  # documented: "eig" needs A ⊗ B − C ⊗ D positive definite ("auto" then uses "schur")
        if call.endswith("logdet"):
            sgn, l = ld_slogdet(K)
            if sgn <= 0 or not sym:
                raise IllPosed(*names)
            return l, 10 * n * eps * (cond(K) + abs(float(l)))
        def as_rows(Y):  # a right-hand side or a result, in the call's format, as vecF rows, and the way back
            Xm, bk = linop_rhs(Y, q, p) if call.endswith("linop") else rhs(Y, rhs_name, q, p)
            return vecF(Xm), bk

        x, back = as_rows(a["x"] if call.endswith("linop") else a["V"])
        Kabs = kron(np.abs(A), np.abs(B)) + kron(np.abs(C), np.abs(D))
        if call.endswith("operator_matmul"):
            y, b = _matvec_ref(K, x, eps)
            b = b + _matvec_ref(Kabs, np.abs(x), eps)[1]
            want = back(unvecF(y, q, p)), back(unvecF(b, q, p))
            if ill_conditioned or grey:  # the product is defined; the set-up may refuse
                raise Either(*names, *grey, want=want)
            return want
        Ks = K.T if call.endswith(".T") else K
        if ill_conditioned:  # the reference cannot answer to working accuracy: judge kronlin's answer by its residual
            raise Either(*names, *grey, judge=_backward_judge(Ks, Kabs.T if call.endswith(".T") else Kabs, x,
                                                              lambda out: as_rows(out)[0], eps))
        y, b = _solve_ref(Ks, x, eps, names)
        # backward stable with respect to the data, not to K = A ⊗ B + s·C ⊗ D itself: a sum that cancels
        # (entries of K far below those of |A|⊗|B| + |C|⊗|D|) magnifies the error by the ratio of their norms
        b = b * max(1.0, tol / eps) * max(1.0, float(_inf_norm(Kabs) / _inf_norm(K)))
        want = back(unvecF(y, q, p)), back(unvecF(b, q, p))
        if grey:
            raise Either(*grey, want=want)
        return want

    bad = {(rhs_name if k == "V" else k): v for k, v in a.bad.items()}
    return Call("stein", call, fn, ref, bad, eps)


def _layers(draw, rng, L=None, shared_ok=False):
    """Per-layer activations ``(N, d_k)`` and back-propagated vectors ``(N, d_{k+1})`` (or ``(N, T, ·)``)."""
    L = draw(st.integers(1, 3)) if L is None else L
    d = [draw(st.integers(1, 3)) for _ in range(L + 1)]
    N = draw(st.integers(2, 6))
    T = draw(st.sampled_from((None, None, 2))) if shared_ok else None
    lead = (N,) if T is None else (N, T)
    acts = [rng.standard_normal(lead + (d[k],)) for k in range(L)]
    grads = [rng.standard_normal(lead + (d[k + 1],)) for k in range(L)]
    return acts, grads


def _as_list(x, name):
    if not isinstance(x, (list, tuple)):
        raise IllPosed(name)
    return list(x)


def _blocks_inverse(Ad, Gd, Ao, Go):
    """Dense ``F̂⁻¹`` of K-FAC §4.3 from the (damped) tridiagonal blocks: the chain's clique formula
    ``Σ_k [F_{k:k+1}]⁻¹ − Σ_{interior k} [F_kk]⁻¹`` (block-diagonal when there are no off-diagonal factors)."""
    F = [kron(a, g) for a, g in zip(Ad, Gd)]
    sizes = [f.shape[0] for f in F]
    off = np.cumsum([0] + sizes)
    P = int(off[-1])
    out = np.zeros((P, P), dtype=LD)
    if Ao is None or len(F) == 1:
        for k, f in enumerate(F):
            out[off[k]:off[k + 1], off[k]:off[k + 1]] = ld_inv(f)
        return out
    for k in range(len(F) - 1):
        Fo = kron(Ao[k], Go[k])
        C = np.block([[F[k], Fo], [Fo.T, F[k + 1]]])
        if np.min(np.linalg.eigvalsh(_split(C)[0])) <= 0:
            raise IllPosed("A_off", "G_off", "gamma", "A_diag", "G_diag")
        out[off[k]:off[k + 2], off[k]:off[k + 2]] += ld_inv(C)
    for k in range(1, len(F) - 1):
        out[off[k]:off[k + 1], off[k]:off[k + 1]] -= ld_inv(F[k])
    return out


@st.composite
def tridiag_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    acts, grads = _layers(draw, rng)
    L, N = len(acts), acts[0].shape[0] + 8
    acts = [np.concatenate([a, rng.standard_normal((8, a.shape[1]))]) for a in acts]
    grads = [np.concatenate([g, rng.standard_normal((8, g.shape[1]))]) for g in grads]
    ab = [np.concatenate([a, np.ones((N, 1))], axis=1) for a in acts]
    cast = lambda M: M.astype(dtype)  # noqa: E731
    Ad = [cast(a.T @ a / N) for a in ab]
    Gd = [cast(g.T @ g / N) for g in grads]
    Ao = [cast(0.5 * ab[k].T @ ab[k + 1] / N) for k in range(L - 1)]
    Go = [cast(0.5 * grads[k].T @ grads[k + 1] / N) for k in range(L - 1)]
    call = draw(st.sampled_from(("BlockDiagInverse.apply", "BlockDiagInverse.to_dense", "BlockDiagInverse.logdet",
                                 "BlockDiagInverse.linop", "BlockTridiagInverse.apply", "BlockTridiagInverse.to_dense",
                                 "BlockTridiagInverse.logdet")))
    tri = call.startswith("BlockTridiag")
    flat = draw(st.booleans())
    V = [rng.standard_normal((g.shape[0], a.shape[0])).astype(dtype) for a, g in zip(Ad, Gd)]
    vals = {"A_diag": Ad, "G_diag": Gd, "A_off": Ao, "G_off": Go, "gamma": draw(st.sampled_from((0.1, 1.0))),
            "pi": draw(st.sampled_from(("trace", "fro", "spectral", 1.0))),
            "method": draw(st.sampled_from(("eig", "smith"))) if not call.endswith("logdet") else "eig",
            "V_list": np.concatenate([np.asarray(vecF(v), dtype) for v in V]) if flat else V,
            "x": rng.standard_normal(sum(v.size for v in V))}
    kinds = {"A_diag": "list", "G_diag": "list", "A_off": "list" if tri else None, "G_off": "list" if tri else None,
             "gamma": "scalar", "pi": _bad_pi, "method": "choice" if tri else None,
             "V_list": ("array" if flat else "list") if call.endswith("apply") else None,
             "x": "array" if call.endswith("linop") else None}
    a = Args(draw, vals, kinds, dtype)

    def fn():
        if tri:
            op = kronlin.BlockTridiagInverse(a["A_diag"], a["G_diag"], a["A_off"], a["G_off"], gamma=a["gamma"],
                                             pi=a["pi"], method=a["method"])
        else:
            op = kronlin.BlockDiagInverse(a["A_diag"], a["G_diag"], gamma=a["gamma"], pi=a["pi"])
        if call.endswith("apply"):
            return op.apply(a["V_list"])
        if call.endswith("linop"):
            return op.aslinearoperator().matvec(a["x"])
        return op.logdet() if call.endswith("logdet") else op.to_dense()

    def ref():
        eps = ceps(*a["A_diag"], *a["G_diag"], *((*a["A_off"], *a["G_off"]) if tri else ())) \
            if all(isinstance(a[k], (list, tuple)) for k in ("A_diag", "G_diag", "A_off", "G_off")) else 2.2e-16
        gamma = scal(a["gamma"], "gamma", lo=0)
        if tri and (not isinstance(a["method"], str) or a["method"] not in ("eig", "smith")):
            raise IllPosed("method")
        lists = {k: _as_list(a[k], k) for k in ("A_diag", "G_diag", "A_off", "G_off")}
        n = len(lists["A_diag"])
        if n == 0 or len(lists["G_diag"]) != n:
            raise IllPosed("A_diag", "G_diag")
        Adl = [square(num(M, f"A_diag[{k}]"), f"A_diag[{k}]") for k, M in enumerate(lists["A_diag"])]
        Gdl = [square(num(M, f"G_diag[{k}]"), f"G_diag[{k}]") for k, M in enumerate(lists["G_diag"])]
        for M, nm in [(M, f"A_diag[{k}]") for k, M in enumerate(Adl)] + [(M, f"G_diag[{k}]") for k, M in enumerate(Gdl)]:
            if np.max(np.abs(M - M.T)) > 1000 * eps * np.max(np.abs(M)):
                raise IllPosed(nm)
        damped = []
        for k, (A, G) in enumerate(zip(Adl, Gdl)):
            names = (f"A_diag[{k}]", f"G_diag[{k}]", "gamma", "pi")
            pv = _pi_ref(A, G, a["pi"], names) if gamma > 0 else LD(1)
            Ak = A + pv * LD(gamma) * np.eye(A.shape[0], dtype=LD)
            Gk = G + LD(gamma) / pv * np.eye(G.shape[0], dtype=LD)
            if not (representable(Ak, eps) and representable(Gk, eps)):
                raise IllPosed(*names)
            for M, nm in ((Ak, names[0]), (Gk, names[1])):
                w = np.linalg.eigvalsh(_split(M)[0])
                if (tri and np.min(w) <= 0) or cond(M) > 1 / (10 * eps):
                    raise IllPosed(nm, "gamma")
            damped.append((Ak, Gk))
        Ao = Go = None
        if tri:
            if len(lists["A_off"]) != n - 1 or len(lists["G_off"]) != n - 1:
                raise IllPosed("A_off", "G_off")
            Ao = [num(M, f"A_off[{k}]") for k, M in enumerate(lists["A_off"])]
            Go = [num(M, f"G_off[{k}]") for k, M in enumerate(lists["G_off"])]
            for k in range(n - 1):
                for M, nm, want in ((Ao[k], f"A_off[{k}]", (Adl[k].shape[0], Adl[k + 1].shape[0])),
                                    (Go[k], f"G_off[{k}]", (Gdl[k].shape[0], Gdl[k + 1].shape[0]))):
                    if M.shape != want or not np.all(np.isfinite(M)):
                        raise IllPosed(nm)
        Finv = _blocks_inverse([d[0] for d in damped], [d[1] for d in damped], Ao, Go)
        P = Finv.shape[0]
        F = ld_inv(Finv)
        # bounds in the Jacobi-scaled matrix (van der Sluis): layers of very different scales are not ill-conditioned
        sd = np.sqrt(np.abs(np.diag(Finv)))
        kappa = cond(Finv / np.outer(sd, sd))
        if kappa > 1 / (100 * eps) or not representable(Finv, eps):
            raise IllPosed("A_diag", "G_diag", "A_off", "G_off", "gamma")
        if call.endswith("logdet"):
            s, l = ld_slogdet(F)
            if s <= 0:
                raise IllPosed("A_diag", "G_diag", "gamma")
            return l, 30 * P * eps * (kappa + abs(float(l)))
        if call.endswith("to_dense"):
            return Finv, 30 * P * eps * kappa * np.outer(sd, sd)
        shapes = [(G.shape[0], A.shape[0]) for A, G in zip(Adl, Gdl)]
        if call.endswith("linop"):
            x = num(a["x"], "x")
            if x.shape != (P,) or not np.all(np.isfinite(x)):
                raise IllPosed("x")
            y = Finv @ x
            return y, 30 * P * eps * kappa * sd * (sd @ np.abs(x))
        Vl = a["V_list"]
        if isinstance(Vl, (list, tuple)):
            if len(Vl) != n:
                raise IllPosed("V_list")
            Vs = [unstack(num(v, f"V_list[{k}]")) for k, v in enumerate(Vl)]
            if any(v.shape != sh or not np.all(np.isfinite(v)) for v, sh in zip(Vs, shapes)):
                raise IllPosed("V_list")
            v = np.concatenate([vecF(v) for v in Vs])
            y, bound = Finv @ v, 30 * P * eps * kappa * sd * (sd @ np.abs(v))
            return _split_layers(y, shapes), _split_layers(bound, shapes)
        v = num(Vl, "V_list")
        if v.shape[-1:] != (P,) or not np.all(np.isfinite(v)):
            raise IllPosed("V_list")
        y = v @ Finv.T
        return y, 30 * P * eps * kappa * (np.abs(v) @ sd)[..., None] * sd

    return Call("tridiag", call, fn, ref, a.bad, eps_of(dtype))


def _grad_columns(acts, errs, names=("acts", "errs")):
    """``(G, Gabs, shapes, N)``: the per-example gradients ``g_{i,s} = Σ_t e_{i,s,t} a_{i,t}ᵀ`` as columns
    ``(P, N·S)`` (layers concatenated; column ``i·S + s``), their magnitudes before any cancellation,
    ``Σ_t |e_{i,s,t}| |a_{i,t}|ᵀ`` (what kronlin's sums are rounded against: the weight-sharing Gram sums the
    products of the positions' terms, not of ``g``), the layer shapes, and the number of examples ``N``.
    ``errs[k]`` may carry S labels per example: ``(N, S, d_out)`` against ``acts[k]`` ``(N, d_in)``, or
    ``(N, S, T, d_out)`` against ``(N, T, d_in)`` (the README's MC / full Fisher columns)."""
    acts, errs = _as_list(acts, names[0]), _as_list(errs, names[1])
    if not acts or len(acts) != len(errs):
        raise IllPosed(*names)
    cols, mags, shapes, N = [], [], [], None
    for k, (a, e) in enumerate(zip(acts, errs)):
        a, e = num(a, f"{names[0]}[{k}]"), num(e, f"{names[1]}[{k}]")
        if a.ndim == 2 and e.ndim in (2, 3):  # no positions: T = 1
            a = a[:, None, :]
            e = e[:, None, None, :] if e.ndim == 2 else e[:, :, None, :]
        elif a.ndim == 3 and e.ndim in (3, 4):
            e = e[:, None] if e.ndim == 3 else e
        else:
            raise IllPosed(f"{names[0]}[{k}]", f"{names[1]}[{k}]")
        # a (N, T, d_in), e (N, S, T, d_out)
        if a.shape[0] != e.shape[0] or a.shape[1] != e.shape[2] or 0 in a.shape or 0 in e.shape:
            raise IllPosed(f"{names[0]}[{k}]", f"{names[1]}[{k}]")
        if N is not None and a.shape[0] != N:
            raise IllPosed(f"{names[0]}[{k}]", f"{names[1]}[{k}]")
        N = a.shape[0]
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
            raise IllPosed(f"{names[0]}[{k}]", f"{names[1]}[{k}]")
        if cols and e.shape[1] * N != cols[0].shape[1]:  # one S for all layers
            raise IllPosed(f"{names[0]}[{k}]", f"{names[1]}[{k}]")
        for part, (ee, aa) in ((cols, (e, a)), (mags, (np.abs(e), np.abs(a)))):
            g = np.einsum("nsto,nti->nsoi", ee, aa)  # (N, S, d_out, d_in)
            part.append(vecF(g.reshape((-1,) + g.shape[2:])).T)
        shapes.append((e.shape[-1], a.shape[-1]))
    return np.concatenate(cols, axis=0), np.concatenate(mags, axis=0), shapes, N


def _split_layers(y, shapes):
    parts, o = [], 0
    for q, p in shapes:
        parts.append(unvecF(y[..., o:o + p * q], q, p))
        o += p * q
    return parts


def _layered_rhs(U, name, shapes):
    """A layered right-hand side as flat rows ``(..., P)`` and a function bringing results back to ``U``'s format."""
    P = sum(p * q for q, p in shapes)
    if isinstance(U, (list, tuple)):
        if len(U) != len(shapes):
            raise IllPosed(name)
        Us = [unstack(num(u, f"{name}[{k}]")) for k, u in enumerate(U)]
        if any(u.shape != sh or not np.all(np.isfinite(u)) for u, sh in zip(Us, shapes)):
            raise IllPosed(name)
        return np.concatenate([vecF(u) for u in Us]), lambda y: _split_layers(y, shapes)
    u = num(U, name)
    if u.ndim < 1 or u.shape[-1] != P or not np.all(np.isfinite(u)):
        raise IllPosed(name)
    return u, lambda y: y


@st.composite
def woodbury_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    acts, errs = _layers(draw, rng, L=draw(st.integers(1, 2)), shared_ok=True)
    acts = [x.astype(dtype) for x in acts]
    errs = [x.astype(dtype) for x in errs]
    shapes = [(e.shape[-1], x.shape[-1]) for x, e in zip(acts, errs)]
    call = draw(st.sampled_from(("solve", "matvec", "quad", "bilinear", "gram", "logdet", "sample", "with_damping",
                                 "batch_gradient", "to_dense", "linop", "solve(batch)")))
    flat = draw(st.booleans())
    U = [rng.standard_normal(sh).astype(dtype) for sh in shapes]
    if flat:
        U = np.concatenate([np.asarray(vecF(u), dtype) for u in U])
    acts2, errs2 = _layers(draw, rng, L=len(acts))
    acts2 = [rng.standard_normal((3,) + x.shape[2:] if x.ndim == 3 else (3, x.shape[-1])) for x in acts]
    errs2 = [rng.standard_normal((3,) + e.shape[2:] if e.ndim == 3 else (3, e.shape[-1])) for e in errs]
    if acts[0].ndim == 3:
        acts2 = [rng.standard_normal((3,) + x.shape[1:]) for x in acts]
        errs2 = [rng.standard_normal((3,) + e.shape[1:]) for e in errs]
    vals = {"acts": acts, "errs": errs, "damping": draw(st.sampled_from((0.1, 1.0))),
            "scale": draw(st.sampled_from((None, 0.5))), "U": U, "V": U, "rng": np.random.default_rng(7),
            "size": draw(st.sampled_from((0, 1, 3))), "new_damping": 0.5, "inverse": draw(st.booleans()),
            "x": rng.standard_normal(sum(p * q for q, p in shapes)), "batch": (acts2, errs2)}
    kinds = dict.fromkeys(vals)
    kinds.update(acts="list", errs="list", damping="scalar" if call != "batch_gradient" else None, scale="scalar")
    kinds.update({"solve": {"U": "array" if flat else "list"}, "matvec": {"U": "array" if flat else "list"},
                  "quad": {"U": "array" if flat else "list"}, "bilinear": {"U": "array" if flat else "list", "V": "array" if flat else "list"},
                  "sample": {"rng": lambda draw: ("rng", draw(st.sampled_from((None, 7, np.random.RandomState(0))))),
                             "size": lambda draw: ("size", draw(st.sampled_from((-1, 2.5, "3", None, True))))},
                  "with_damping": {"new_damping": "scalar"}, "linop": {"x": "array", "inverse": "flag"},
                  "solve(batch)": {"batch": lambda draw: ("batch", draw(st.sampled_from(
                      (None, 3, (acts2,), ([None], errs2), (acts2[:1] + acts2, errs2), (errs2, acts2)))))}}.get(call, {}))
    a = Args(draw, vals, kinds, dtype)

    def fn():
        if call == "batch_gradient":
            return kronlin.WoodburyFisher.batch_gradient(a["acts"], a["errs"], a["scale"])
        F = kronlin.WoodburyFisher(a["acts"], a["errs"], a["damping"], a["scale"])
        if call in ("solve", "matvec", "quad"):
            return getattr(F, call)(a["U"])
        if call == "bilinear":
            return F.bilinear(a["U"], a["V"])
        if call == "sample":
            return F.sample(a["rng"], a["size"])
        if call == "with_damping":
            return F.with_damping(a["new_damping"]).solve(a["U"])
        if call == "linop":
            return F.aslinearoperator(inverse=a["inverse"]).matvec(a["x"])
        if call == "solve(batch)":
            return F.solve(batch=a["batch"])
        return getattr(F, call)()

    def ref():
        eps = ceps(*a["acts"], *a["errs"]) if isinstance(a["acts"], (list, tuple)) and isinstance(a["errs"], (list, tuple)) else 2.2e-16
        Gm, Gabs, shp, N = _grad_columns(a["acts"], a["errs"])
        lam = scal(a["damping"], "damping", lo=0)
        scale = LD(1) / N if a["scale"] is None else LD(scal(a["scale"], "scale", positive=True))
        P, M = Gm.shape
        if call == "batch_gradient":
            g = Gm.sum(axis=1) * scale
            if not representable(g, eps):
                raise IllPosed("acts", "errs", "scale")
            parts = _split_layers(g, shp)
            return parts, [10 * N * eps * scale * _split_layers(Gabs.sum(axis=1), shp)[k] for k in range(len(parts))]
        K = scale * Gm.T @ Gm
        F = scale * Gm @ Gm.T
        needs_K = call in ("gram", "solve", "with_damping", "solve(batch)", "logdet", "sample") or \
            (call == "linop" and a["inverse"] is True)
        if (needs_K and not representable(K, eps)) or (call == "to_dense" and not representable(F, eps)):
            raise IllPosed("acts", "errs", "scale")
        if call == "with_damping":
            lam = scal(a["new_damping"], "new_damping", lo=0)
        Fd = F + LD(lam) * np.eye(P, dtype=LD)
        absF = scale * Gabs @ Gabs.T
        if call == "gram":
            return K, 10 * (P + M) * eps * scale * Gabs.T @ Gabs
        if call == "to_dense":
            return F, 10 * (P + M) * eps * absF
        inverse = call in ("solve", "with_damping", "solve(batch)", "logdet", "sample") or (call == "linop" and a["inverse"])
        if call == "linop" and not isinstance(a["inverse"], (bool, np.bool_)):
            raise IllPosed("inverse")
        if inverse:
            if lam <= 0 or (call != "logdet" and 1.0 / lam >= fmax(eps)):
                raise IllPosed("damping", "new_damping")
            kappa = cond(K + LD(lam) * np.eye(M, dtype=LD))  # the M × M matrix the Woodbury form factors
            if kappa > 1 / (100 * eps):
                raise IllPosed("damping", "acts", "errs", "scale")
        if call == "logdet":  # (P − M) log λ + log det(λI + K), the determinant lemma, in extended precision
            s_, l = ld_slogdet(K + LD(lam) * np.eye(M, dtype=LD))
            l = l + (P - M) * np.log(LD(lam))
            return l, 30 * (P + M) * eps * (kappa + abs(float(l)))
        if call == "sample":
            rng2, size = a["rng"], a["size"]
            if not isinstance(rng2, np.random.Generator):
                raise IllPosed("rng")
            if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size < 0:
                raise IllPosed("size")
            rng2 = np.random.default_rng(7)  # the generator the call consumed, from its start
            npd = np.float32 if eps > 1e-10 else np.float64
            Ys = [ld(rng2.standard_normal((size,) + sh, dtype=npd)) for sh in shp]
            z = ld(rng2.standard_normal((size, M), dtype=npd))
            y = np.concatenate([vecF(Y) for Y in Ys], axis=-1) if size else np.zeros((0, P), LD)
            Kd = K + LD(lam) * np.eye(M, dtype=LD)
            rhs_ = y @ Gm * scale + z * np.sqrt(scale * LD(lam))
            w = np.stack([ld_solve(Kd, r) for r in rhs_]) if size else np.zeros((0, M), LD)
            x = (y - w @ Gm.T) / np.sqrt(LD(lam))
            bound = 30 * (P + M) * eps * cond(Kd) * (np.max(np.abs(x), initial=1) + 1) + 0 * x
            return _split_layers(x, shp), _split_layers(bound, shp)
        if call == "solve(batch)":
            b = a["batch"]
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                raise IllPosed("batch")
            G2, _, shp2, N2 = _grad_columns(b[0], b[1], ("batch acts", "batch errs"))
            if shp2 != shp:
                raise IllPosed("batch")
            u, back = G2.sum(axis=1) / N2, lambda y: _split_layers(y, shp)
        elif call == "linop":
            u = num(a["x"], "x")
            if u.shape not in ((P,), (P, 1)) or not np.all(np.isfinite(u)):
                raise IllPosed("x")
            shape = u.shape
            u, back = u.reshape(P), lambda y: y.reshape(shape)
        else:
            u, back = _layered_rhs(a["U"], "U", shp)
        u = u[None] if u.ndim == 1 else u
        if call in ("quad", "bilinear"):
            v, _ = _layered_rhs(a["V"], "V", shp) if call == "bilinear" else (u, None)
            v = v[None] if v.ndim == 1 else v
            val = np.sum((u @ F) * v, axis=-1)
            bound = 30 * (P + M) * eps * np.sum((np.abs(u) @ absF) * np.abs(v), axis=-1)
            if not representable(val, eps):
                raise IllPosed("acts", "errs", "U", "V")
            shape = np.broadcast_shapes(np.shape(a["U"] if not isinstance(a["U"], (list, tuple)) else np.zeros(1))[:-1],
                                        np.shape(a["V"] if not isinstance(a["V"], (list, tuple)) else np.zeros(1))[:-1]) \
                if call == "bilinear" else np.shape(a["U"])[:-1] if not isinstance(a["U"], (list, tuple)) else ()
            return val.reshape(shape), bound.reshape(shape)
        if inverse:  # the Woodbury form λ⁻¹(u − G(λI + K)⁻¹Gᵀu): errors ∝ cond(λI + K)·|u|/λ
            y = np.stack([ld_solve(Fd, r) for r in u.reshape(-1, P)]).reshape(u.shape) if cond(Fd) < 1e14 else None
            if y is None:
                y = (u - (u @ Gm) @ ld_inv(K + LD(lam) * np.eye(M, dtype=LD)) @ Gm.T * scale) / LD(lam)
            b = 30 * (P + M) * eps * kappa * np.max(np.abs(u)) / LD(lam) + 0 * y
        else:  # a float64 right-hand side makes a float64 result: representable there
            y, b = _matvec_ref(F, u, eps, rep_eps=ceps(*a["acts"], *a["errs"], *(a["U"] if isinstance(a["U"], (list, tuple)) else [a["U"]])))
            b = b + 30 * (P + M) * eps * np.abs(u) @ absF
        squeeze = (lambda t: t[0]) if (call == "linop" or call == "solve(batch)" or
                                       (not isinstance(a["U"], (list, tuple)) and np.ndim(a["U"]) == 1) or
                                       (isinstance(a["U"], (list, tuple)) and all(np.ndim(x) == 2 for x in a["U"]))) else (lambda t: t)
        return back(squeeze(y)), back(squeeze(b))

    bad = {("damping" if k == "new_damping" else k): v for k, v in a.bad.items()}  # with_damping(damping)
    return Call("woodbury", f"WoodburyFisher.{call}", fn, ref, bad, eps_of(dtype))


@st.composite
def factors_calls(draw):
    dtype = draw(st.sampled_from(("float64", "float32")))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    acts, grads = _layers(draw, rng, shared_ok=True)
    acts2, grads2 = [rng.standard_normal(x.shape) for x in acts], [rng.standard_normal(g.shape) for g in grads]
    acts, grads = [x.astype(dtype) for x in acts], [g.astype(dtype) for g in grads]
    shared = acts[0].ndim == 3
    call = draw(st.sampled_from(("batch_factors", "FactorEstimator.update", "FactorEstimator.load_state_dict",
                                 "FactorEstimator.block_diag_inverse")))
    est = kronlin.FactorEstimator(tridiagonal=not shared).update(acts, grads)
    state = est.state_dict()
    vals = {"acts": acts, "grads": grads, "append_one": draw(st.booleans()), "tridiagonal": not shared and draw(st.booleans()),
            "max_decay": draw(st.sampled_from((0.0, 0.5, 0.95))), "state": state, "gamma": 0.1, "pi": "trace"}
    kinds = dict.fromkeys(vals)
    if call == "FactorEstimator.load_state_dict":
        def bad_state(draw):
            how = draw(st.sampled_from(("none", "list", "missing", "step", "max_decay", "flag", "stats", "A_diag",
                                        "item", "step0")))
            st_ = {k: v for k, v in state.items()}
            st_["stats"] = dict(state["stats"])
            if how == "none":
                return how, None
            if how == "list":
                return how, [state]
            if how == "missing":
                del st_[draw(st.sampled_from(sorted(st_)))]
            elif how in ("step", "max_decay"):
                st_[how] = draw(st.sampled_from((-1, 1.5, "1", None, float("nan"), True)))
            elif how == "flag":
                st_[draw(st.sampled_from(("tridiagonal", "append_one")))] = draw(st.sampled_from(("no", 1, None)))
            elif how == "stats":
                st_["stats"] = draw(st.sampled_from(("abc", [1], 3.0)))
            elif how == "A_diag":
                st_["stats"]["A_diag"] = bad_list(draw, state["stats"]["A_diag"], dtype)[1]
            elif how == "item":
                key = draw(st.sampled_from(("A_diag", "G_diag", "A_off", "G_off")))
                st_["stats"][key] = bad_list(draw, state["stats"][key], dtype)[1]
            else:
                st_["step"] = 0
            return how, st_
        kinds["state"] = bad_state
    else:
        kinds.update(acts="list", grads="list", append_one="flag", tridiagonal="flag" if not shared else None,
                     max_decay="scalar" if call == "FactorEstimator.update" else None)
        if call.endswith("block_diag_inverse"):
            kinds.update(acts=None, grads=None, append_one=None, tridiagonal=None, gamma="scalar", pi=_bad_pi)
    a = Args(draw, vals, kinds, dtype)
    keys = ("A_diag", "G_diag", "A_off", "G_off")

    def fn():
        if call == "batch_factors":
            return kronlin.batch_factors(a["acts"], a["grads"], append_one=a["append_one"], tridiagonal=a["tridiagonal"])
        if call == "FactorEstimator.update":
            e = kronlin.FactorEstimator(max_decay=a["max_decay"], tridiagonal=a["tridiagonal"], append_one=a["append_one"])
            e.update(a["acts"], a["grads"]).update(acts2, grads2)
            return {k: getattr(e, k) for k in keys}
        if call == "FactorEstimator.load_state_dict":
            e = kronlin.FactorEstimator().load_state_dict(a["state"])
            return {k: getattr(e, k) for k in keys}
        return est.block_diag_inverse(gamma=a["gamma"], pi=a["pi"]).to_dense()

    def moments(acts_, grads_, append_one, tridiagonal):
        acts_, grads_ = _as_list(acts_, "acts"), _as_list(grads_, "grads")
        if not acts_ or len(acts_) != len(grads_):
            raise IllPosed("acts", "grads")
        A = [num(x, f"acts[{k}]") for k, x in enumerate(acts_)]  # (2, N, d) is a weight-sharing layer, not a stack
        G = [num(g, f"grads[{k}]") for k, g in enumerate(grads_)]
        N = A[0].shape[0] if A[0].ndim else None
        for k, (x, g) in enumerate(zip(A, G)):
            if x.ndim not in (2, 3) or g.ndim != x.ndim or x.shape[0] != N or g.shape[0] != N or x.shape[1:-1] != g.shape[1:-1]:
                raise IllPosed(f"acts[{k}]", f"grads[{k}]", "acts", "grads")
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(g))) or N == 0:
                raise IllPosed(f"acts[{k}]", f"grads[{k}]")
            if x.ndim == 3 and tridiagonal:
                raise IllPosed(f"acts[{k}]", "tridiagonal")
        T = [1 if x.ndim == 2 else x.shape[1] for x in A]
        A = [x.reshape(-1, x.shape[-1]) for x in A]
        G = [g.reshape(-1, g.shape[-1]) for g in G]
        if append_one:
            A = [np.concatenate([x, np.ones((x.shape[0], 1), LD)], axis=1) for x in A]
        n = len(A)
        out = {"A_diag": [x.T @ x / N for x in A], "G_diag": [g.T @ g / (N * t) for g, t in zip(G, T)],
               "A_off": [A[k].T @ A[k + 1] / N for k in range(n - 1)] if tridiagonal else [],
               "G_off": [G[k].T @ G[k + 1] / N for k in range(n - 1)] if tridiagonal else []}
        absb = {"A_diag": [np.abs(x).T @ np.abs(x) / N for x in A], "G_diag": [np.abs(g).T @ np.abs(g) / (N * t) for g, t in zip(G, T)],
                "A_off": [np.abs(A[k]).T @ np.abs(A[k + 1]) / N for k in range(n - 1)] if tridiagonal else [],
                "G_off": [np.abs(G[k]).T @ np.abs(G[k + 1]) / N for k in range(n - 1)] if tridiagonal else []}
        return out, absb, N

    def ref():
        eps = ceps(*acts)
        if call == "FactorEstimator.block_diag_inverse":
            gamma = scal(a["gamma"], "gamma", lo=0)
            Ad = [ld(M) for M in state["stats"]["A_diag"]]
            Gd = [ld(M) for M in state["stats"]["G_diag"]]
            damped = []
            for A, G in zip(Ad, Gd):
                pv = _pi_ref(A, G, a["pi"], ("pi", "gamma")) if gamma > 0 else LD(1)
                damped.append((A + pv * LD(gamma) * np.eye(A.shape[0], dtype=LD), G + LD(gamma) / pv * np.eye(G.shape[0], dtype=LD)))
                if cond(damped[-1][0]) > 1 / (10 * eps) or cond(damped[-1][1]) > 1 / (10 * eps):
                    raise IllPosed("gamma", "pi", "A_diag", "G_diag")  # the estimator's statistics, damped
            Finv = _blocks_inverse([d[0] for d in damped], [d[1] for d in damped], None, None)
            return Finv, 30 * Finv.shape[0] * eps * cond(Finv) * np.max(np.abs(Finv)) + 0 * Finv
        if call == "FactorEstimator.load_state_dict":
            st_ = a["state"]
            if not isinstance(st_, dict) or any(k not in st_ for k in state) or type(st_["step"]) is not int or \
                    st_["step"] != state["step"] or type(st_["max_decay"]) is not float or \
                    st_["max_decay"] != state["max_decay"] or any(st_[k] is not state[k] for k in ("tridiagonal", "append_one")):
                raise IllPosed("state", "step", "max_decay", "tridiagonal", "append_one", "stats")
            stats = st_["stats"]
            if not isinstance(stats, dict) or any(not isinstance(stats.get(k), (list, tuple)) or len(stats[k]) != len(state["stats"][k]) for k in keys):
                raise IllPosed("stats", *keys)
            out = {}
            for k in keys:
                out[k] = []
                for i, (M, M0) in enumerate(zip(stats[k], state["stats"][k])):
                    M = num(M, f"{k}[{i}]")
                    if M.shape != M0.shape or not np.all(np.isfinite(M)):
                        raise IllPosed(f"{k}[{i}]", k)
                    out[k].append(M)
            return out, {k: [0 * M for M in v] for k, v in out.items()}
        for nm in ("append_one", "tridiagonal"):
            if not isinstance(a[nm], (bool, np.bool_)):
                raise IllPosed(nm)
        m1, b1, N = moments(a["acts"], a["grads"], a["append_one"], a["tridiagonal"])
        for k in keys:
            for i, M in enumerate(m1[k]):
                if not representable(M, eps):
                    raise IllPosed("acts", "grads", f"acts[{i}]", f"grads[{i}]")
        bound = {k: [30 * N * eps * B for B in v] for k, v in b1.items()}
        if call == "batch_factors":
            return m1, bound
        md = scal(a["max_decay"], "max_decay", lo=0)
        if md >= 1:
            raise IllPosed("max_decay")
        m2, b2, N2 = moments(acts2, grads2, a["append_one"], a["tridiagonal"])
        e = min(0.5, md)
        out = {k: [e * x + (1 - e) * y for x, y in zip(m1[k], m2[k])] for k in keys}
        return out, {k: [bb + 30 * N2 * eps * c for bb, c in zip(bound[k], b2[k])] for k in keys}

    return Call("factors", call, fn, ref, a.bad, eps_of(dtype))


HAVE_JAX = importlib.util.find_spec("jax") is not None


@st.composite
def misc_calls(draw):
    """``jax_callback`` (when JAX is installed: the test extra installs it) and ``extension_info``."""
    call = draw(st.sampled_from(("jax_callback", "extension_info") if HAVE_JAX else ("extension_info",)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    A, G = spd(rng, 3, 10.0), spd(rng, 2, 10.0)
    X = rng.standard_normal((2, 3))
    vals = {"op": "jax", "method": draw(st.sampled_from(("solve", "__matmul__", "matvec"))), "X": X}
    kinds = {"op": lambda draw: ("op", draw(st.sampled_from((None, "Kron", A, "numpy-op")))), "method": "choice",
             "X": None} if call == "jax_callback" else dict.fromkeys(vals)
    a = Args(draw, vals, kinds, "float64")

    def fn():
        if call == "extension_info":
            info = kronlin.extension_info()
            return np.float64(isinstance(info, dict) and "cpu_extension" in info)
        import jax.numpy as jnp

        op = a["op"]
        if isinstance(op, str) and op == "jax":
            op = kronlin.Kron(jnp.asarray(A), jnp.asarray(G))  # float32 (jax_enable_x64 is off)
        elif isinstance(op, str) and op == "numpy-op":
            op = kronlin.Kron(A, G)
        f = kronlin.jax_callback(op, a["method"])
        return np.asarray(f(jnp.asarray(X)))

    def ref():
        if call == "extension_info":
            return LD(1), LD(0)
        if not (isinstance(a["op"], str) and a["op"] == "jax"):
            raise IllPosed("op")
        if a["method"] not in ("solve", "__matmul__", "matvec"):
            raise IllPosed("method")
        K = kron(A.astype(np.float32), G.astype(np.float32))
        y, b = (_solve_ref if a["method"] == "solve" else _matvec_ref)(K, vecF(X.astype(np.float32))[None], eps_of("float32"))
        return unvecF(y, 2, 3)[0], unvecF(b, 2, 3)[0]

    return Call("misc", call, fn, ref, a.bad, 2.2e-16)


ENTRY_POINTS = {
    "woodbury": woodbury_calls,
    "factors": factors_calls,
    "misc": misc_calls,
    "tridiag": tridiag_calls,
    "damping": damping_calls,
    "stein": stein_calls,
    "Kron": kron_calls,
    "KronEigh": kron_eigh_calls,
}


# -- the driver -------------------------------------------------------------------------------------------------------
def run(groups, examples: int, strict: bool, trace=None, max_failures: int = 20):
    counts = defaultdict(Counter)
    failures = []

    for name in groups:
        strategy = ENTRY_POINTS[name]

        @settings(max_examples=examples, **SETTINGS)
        @given(strategy())
        def check(call):
            if trace is not None:
                print(call.describe(), file=trace, flush=True)
            outcome, detail = classify(call)
            counts[call.label][outcome] += 1
            counts[call.label]["bad_input" if call.bad else "well_posed"] += 1
            if outcome == "other":
                if len(failures) < max_failures:
                    failures.append(f"{call.describe()}: {detail}")
                if strict:
                    raise AssertionError(f"{call.describe()}: {detail}")

        check()
    return counts, failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=40, help="hypothesis examples per entry-point group")
    ap.add_argument("--groups", default=",".join(ENTRY_POINTS))
    ap.add_argument("--strict", action="store_true", help="stop at the first 'other' outcome (hypothesis shrinks it)")
    ap.add_argument("--trace", default=None, help="append each call's description to this file before making it")
    args = ap.parse_args(argv)
    trace = open(args.trace, "a") if args.trace else None
    counts, failures = run(args.groups.split(","), args.examples, args.strict, trace)
    print(json.dumps({"counts": {k: dict(v) for k, v in sorted(counts.items())}, "failures": failures}))


if __name__ == "__main__":
    main()
