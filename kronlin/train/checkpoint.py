"""Exact, pickle-free checkpoints written atomically.

A checkpoint is one ``.npz`` archive (``numpy.savez``, loaded with
``allow_pickle=False``): every NumPy array of the saved tree is stored as its
own member, and the tree around them (dicts, lists, tuples, Python ints of any
size such as a PCG64 state, floats, strings, bools, ``None``) as a JSON
document in the member ``__tree__``.  Floats go through ``repr`` (exact round
trip, ``nan``/``inf`` included), arrays keep dtype and bits, NumPy scalars
become 0-d arrays and come back as NumPy scalars — so a resumed run continues
bit for bit.

:func:`atomic_write` writes any file through a temporary file in the target's
directory, ``fsync``s it and ``os.replace``s it over the target: a crash at any
point leaves either the old file or the new one, never a torn mix; the
temporary file is removed when the write fails.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "encode_tree", "decode_tree"]

_TREE = "__tree__"


def encode_tree(tree) -> tuple[str, dict]:
    """``(json_text, arrays)`` for a nested structure of arrays and Python values."""
    arrays: dict = {}

    def enc(x):
        if isinstance(x, (np.ndarray, np.generic)):
            key = f"a{len(arrays)}"
            arr = np.asarray(x)
            if arr.dtype == object:
                raise TypeError("object arrays cannot be checkpointed")
            arrays[key] = arr
            return {"__array__": key, "scalar": isinstance(x, np.generic)}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return {"__int__": str(x)}  # any size, exactly
        if isinstance(x, float):
            return {"__float__": repr(x)}
        if isinstance(x, dict):
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__}")

    return json.dumps(enc(tree)), arrays


def decode_tree(text: str, arrays) -> object:
    """The inverse of :func:`encode_tree`."""

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__array__" in x:
                arr = np.array(arrays[x["__array__"]])
                return arr[()] if x["scalar"] else arr
            if "__int__" in x:
                return int(x["__int__"])
            if "__float__" in x:
                return float(x["__float__"])
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            if "__dict__" in x:
                return {dec(k): dec(v) for k, v in x["__dict__"]}
            raise ValueError(f"corrupt checkpoint tree node {sorted(x)}")
        return x

    return dec(json.loads(text))


def atomic_write(path, write) -> None:
    """Write ``path`` through ``write(fileobj)`` so that it is replaced atomically or not at all."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


def save_checkpoint(path, tree) -> None:
    """Atomically write ``tree`` (see the module docstring) to ``path`` as an ``.npz`` archive."""
    text, arrays = encode_tree(tree)
    if _TREE in arrays:  # pragma: no cover - keys are a0, a1, ...
        raise AssertionError
    members = {_TREE: np.array(text), **arrays}
    atomic_write(path, lambda f: np.savez(f, **members))


def load_checkpoint(path):
    """The tree saved by :func:`save_checkpoint` (no pickle is ever loaded)."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if _TREE not in z.files:
            raise ValueError(f"{path} is not a kronlin.train checkpoint (no {_TREE} member)")
        arrays = {k: z[k] for k in z.files if k != _TREE}
        return decode_tree(str(z[_TREE]), arrays)
