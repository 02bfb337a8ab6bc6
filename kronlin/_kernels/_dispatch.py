"""The one place that chooses, for a kernel family, between the compiled C++ kernel, the CUDA kernel and the reference.

Every family module under ``kronlin/_kernels/`` asks :func:`kernel` for its
compiled function; ``None`` means "use your NumPy/array-API reference".  The
choice depends only on the compute namespace:

* NumPy arrays → ``kronlin._C`` (CPU, C++/OpenMP), when built and enabled;
* CuPy arrays → ``kronlin._cuda`` (CUDA), when built, enabled and a device exists;
* anything else (``array_api_strict``) → the reference.

Both compiled modules take arrays, not pointers, and check dtype, shape,
layout (and for CUDA device and stream) themselves; the CUDA functions get the
current CuPy stream as their last argument, which :class:`Kernel` supplies, so
a family calls both backends with the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .. import _ext
from .._backend import is_cupy, is_numpy

__all__ = ["Kernel", "kernel", "module_for"]


@dataclass(frozen=True)
class Kernel:
    """A compiled kernel bound to its backend.

    Attributes
    ----------
    fn : callable
        The compiled function (``kronlin._C.<name>`` or ``kronlin._cuda.<name>``).
    device : str
        ``"cpu"`` or ``"cuda"``.
    stream : callable or None
        For CUDA: returns the launch stream (an integer ``cudaStream_t``).
    """

    fn: Callable
    device: str
    stream: Callable[[], int] | None = None

    def __call__(self, *args, **kwargs):
        if self.stream is not None:
            kwargs["stream"] = self.stream()
        return self.fn(*args, **kwargs)


def _cupy_stream() -> int:
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


def module_for(xp) -> tuple[Any, str] | tuple[None, None]:
    """``(compiled module, device)`` serving namespace ``xp``, or ``(None, None)``."""
    if is_numpy(xp):
        mod = _ext.cpu()
        return (mod, "cpu") if mod is not None else (None, None)
    if is_cupy(xp):
        mod = _ext.cuda()
        return (mod, "cuda") if mod is not None else (None, None)
    return None, None


def kernel(xp, name: str) -> Kernel | None:
    """The compiled kernel ``name`` for namespace ``xp``, or ``None`` (use the reference).

    ``None`` also when the module serving ``xp`` has no such kernel (for
    example the generalized-Sylvester back-substitution exists on the CPU only).
    """
    mod, device = module_for(xp)
    fn = getattr(mod, name, None) if mod is not None else None
    if fn is None:
        return None
    return Kernel(fn, device, _cupy_stream if device == "cuda" else None)
