"""Type and range checks of optimizer hyper-parameters: the one place they are validated.

Every optimizer declares ``spec = {name: Param, ...}`` next to its
``defaults`` (the same keys).  :func:`check_hparams` checks a dict of values
against it: unknown names, wrong types (a string where a number is expected,
``"maybe"`` for a switch, a float for a period) and values out of range are
refused with a :class:`HyperParameterError` (a ``ValueError``) that names the
optimizer, the hyper-parameter and what it accepts::

    sgd: hyper-parameter lr must be a finite number > 0; got -1
    kfac: hyper-parameter momentum must be true or false; got 'maybe' (str)

Conditions that tie several hyper-parameters together (``T2`` a multiple of
``T3``, ``S <= T``) stay in the optimizer's own ``_validate``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["Param", "real", "integer", "boolean", "choice", "POSITIVE", "NONNEGATIVE", "OPEN_UNIT", "HALF_OPEN_UNIT", "check_hparams", "HyperParameterError"]


class HyperParameterError(ValueError):
    """A hyper-parameter that is unknown, of the wrong type or out of range (``key`` names it)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Param:
    """What one hyper-parameter accepts.

    ``kind`` is ``"real"`` (a finite int or float, not a bool), ``"int"`` (an
    integer, not a bool), ``"bool"`` or ``"str"`` (one of ``names``);
    ``low``/``high`` bound numbers (``low_open``/``high_open``: strictly);
    ``names`` are strings accepted as well as a number (``pi``: a norm or a
    number); ``optional``: ``None`` is also accepted.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    names: tuple = ()
    optional: bool = False

    def describe(self) -> str:
        """What the hyper-parameter accepts, in words."""
        if self.kind == "bool":
            text = "true or false"
        else:
            text = "an integer" if self.kind == "int" else "a finite number"
            lo, hi = self.low, self.high
            if lo is not None and hi is not None:
                text += f" in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
            elif lo is not None:
                text += f" {'>' if self.low_open else '>='} {lo:g}"
            elif hi is not None:
                text += f" {'<' if self.high_open else '<='} {hi:g}"
            names = ", ".join(repr(n) for n in self.names)
            if self.kind == "str":
                text = f"one of {names}"
            elif names:
                text = f"one of {names} or {text}"
        return text + (" (or none)" if self.optional else "")

    def accepts(self, value) -> bool:
        """Whether ``value`` has the right type and range."""
        if value is None:
            return self.optional
        if isinstance(value, str):
            return value in self.names
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind == "int" and not isinstance(value, numbers.Integral):
            return False
        x = float(value)
        if not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)


def real(low=None, high=None, *, low_open=False, high_open=False, optional=False, names=()) -> Param:
    """A finite real number in the given range (``names``: strings accepted as well)."""
    return Param("real", low, high, low_open, high_open, tuple(names), optional)


def integer(low=1, high=None, *, optional=False) -> Param:
    """An integer ``>= low`` (and ``<= high``)."""
    return Param("int", low, high, optional=optional)


def boolean() -> Param:
    """``True`` or ``False``."""
    return Param("bool")


def choice(*names) -> Param:
    """One of the strings ``names``."""
    return Param("str", names=tuple(names))


#: Ranges several optimizers share.
POSITIVE = real(0, low_open=True)
NONNEGATIVE = real(0)
OPEN_UNIT = real(0, 1, low_open=True, high_open=True)  # (0, 1): factors such as reject_factor
HALF_OPEN_UNIT = real(0, 1, high_open=True)  # [0, 1): momenta and decays


def check_hparams(owner: str, spec: dict, values: dict) -> None:
    """Raise :class:`HyperParameterError` unless every ``values[k]`` is a known, well-typed, in-range hyper-parameter."""
    if not isinstance(values, dict):
        raise HyperParameterError(f"{owner}: hyper-parameters must be a dict; got {type(values).__name__}")
    unknown = sorted(str(k) for k in values if k not in spec)
    if unknown:
        raise HyperParameterError(
            f"{owner}: unknown hyper-parameter(s) {unknown}; known: {sorted(spec)}", key=unknown[0]
        )
    for key, value in values.items():
        param = spec[key]
        if not param.accepts(value):
            shown = repr(value) if value is None or isinstance(value, numbers.Real) else f"{value!r} ({type(value).__name__})"
            raise HyperParameterError(f"{owner}: hyper-parameter {key} must be {param.describe()}; got {shown}", key=key)
