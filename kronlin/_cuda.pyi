"""Stubs of kronlin._cuda, the private CUDA extension (built whenever CMake finds nvcc)."""

def eig_scale(
    Y: int, lg: int, la: int, B: int, q: int, p: int, shift: float, power: float, is_double: bool, stream: int
) -> None:
    """In place on device pointers: ``Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power`` on ``stream``."""

def woodbury_gram_shared(
    A: int, E: int, K: int, N: int, S: int, T: int, da: int, de: int, scale: float, is_double: bool, stream: int
) -> None:
    """On device pointers: ``K`` (N*S, N*S) = scale * per-example Gram of a weight-sharing layer, on ``stream``."""

def device_count() -> int:
    """Visible CUDA devices (0 without a driver or device)."""
