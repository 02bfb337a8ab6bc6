"""``jax_callback``: kronlin's solves inside ``jax.jit`` through ``jax.pure_callback``.

kronlin computes eagerly on concrete arrays (LAPACK, its compiled kernels), so a
traced JAX value cannot enter it; under ``jax.jit`` the call has to leave the
trace.  ``jax.pure_callback`` does exactly that: at run time JAX hands the
concrete input to a host function and takes its result back into the
compiled program.  Build the operator outside the traced function (its
set-up, e.g. an eigendecomposition, is done once), then::

    K = kronlin.Kron(A, G)                      # jax arrays, concrete
    solve = kronlin.jax_callback(K, "solve")    # jit-compatible X -> K.solve(X)
    step = jax.jit(lambda g: -lr * solve(g))(grad)

No derivative flows through the callback (kronlin's results are constants to
autodiff), and ``jax.vmap`` of the callback is sequential.  An operator built
from JAX CPU arrays computes with NumPy in the host function.  One built from
JAX GPU arrays keeps computing on the GPU, with CuPy: ``pure_callback`` always
hands its host function host (NumPy) arrays, so each call copies the
right-hand side to the device and the result back (two transfers of the
right-hand side's size; the operator's own arrays stay on the device).
"""

from __future__ import annotations

import copy

import numpy as np

from ._backend import Ctx, is_numpy
from ._validate import check_choice

__all__ = ["jax_callback"]

#: Methods whose result has the shape of their right-hand side (so the callback's
#: output shape is known before it runs).
SHAPE_PRESERVING = ("solve", "__matmul__", "matvec", "power")


def _host_view(op):
    """``(view, to_xp, to_host)``: a shallow copy of ``op`` that takes and returns arrays of its compute library
    (NumPy, or CuPy for JAX GPU arrays), with the conversions from and to the callback's host NumPy arrays."""
    from ._operator import Operator

    if not isinstance(op, Operator):
        raise TypeError(f"op must be a kronlin operator (Kron, KronEigh, WoodburyFisher, ...); got {type(op).__name__}")
    ctx = op._ctx
    if ctx.foreign is None or ctx.foreign.__name__.split(".")[0] != "jax":
        built = ctx.name if ctx.foreign is None else ctx.foreign.__name__.split(".")[0]
        raise TypeError(
            f"op must be an operator built from JAX arrays for jax_callback (this one was built from {built} "
            f"arrays); build it from the jax arrays the jitted function will see"
        )
    view = copy.copy(op)
    view._ctx = Ctx(ctx.xp, ctx.dtype, None)
    if is_numpy(ctx.xp):
        return view, np.asarray, np.asarray
    return view, ctx.xp.asarray, ctx.xp.asnumpy  # CuPy: JAX GPU arrays


def jax_callback(op, method: str = "solve", **kwargs):
    """A jit-compatible function ``X -> op.<method>(X, **kwargs)`` through ``jax.pure_callback``.

    Parameters
    ----------
    op : a kronlin operator built from (concrete) JAX arrays, on the CPU or a GPU
    method : {"solve", "__matmul__", "matvec", "power"}
        A method whose result has the shape of its right-hand side.
    **kwargs :
        Fixed keyword arguments of the method (``damping=``, ``power=``).

    Returns
    -------
    function
        Takes ``X`` (an array, or a list of per-layer arrays for a layered
        operator) as a JAX value, traced or not, and returns the result as one.
    """
    import jax

    check_choice(method, SHAPE_PRESERVING, "method")
    view, to_xp, to_host = _host_view(op)
    fn = getattr(view, method)
    op_dtype = np.dtype(str(op.dtype).split(".")[-1])

    def host(X):
        X = jax.tree.map(lambda x: to_xp(np.asarray(x)), X)  # the callback may receive JAX arrays
        out = fn(X, **kwargs)
        return jax.tree.map(lambda a, x: np.asarray(to_host(a), dtype=np.result_type(op_dtype, x.dtype)), out, X)

    def call(X):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.result_type(op_dtype, x.dtype)), X)
        return jax.pure_callback(host, shapes, X)

    return call
