"""Exact, pickle-free checkpoints written atomically.

A checkpoint is one ``.npz`` archive (``numpy.savez``, loaded with
``allow_pickle=False``): every NumPy array of the saved tree is stored as its
own member, and the tree around them (dicts, lists, tuples, Python ints of any
size such as a PCG64 state, floats, strings, bools, ``None``) as a JSON
document in the member ``__tree__``.  Floats go through ``repr`` (exact round
trip, ``nan``/``inf`` included), arrays keep dtype and bits, NumPy scalars
become 0-d arrays and come back as NumPy scalars — so a resumed run continues
bit for bit.  :func:`load_checkpoint` reads every member (each is CRC-checked)
and turns whatever a damaged file raises into one :class:`CheckpointError`.

:func:`atomic_write` writes any file through a temporary file in the target's
directory, ``fsync``s it and ``os.replace``s it over the target: a crash at any
point leaves either the old file or the new one, never a torn mix; the
temporary file is removed when the write fails, and one left by a killed
process is removed by the next write of the same file.  Files follow the
umask (or keep the mode of the file they replace), like ordinary writes.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile

import numpy as np

__all__ = ["atomic_write", "remove_stale_temporaries", "save_checkpoint", "load_checkpoint", "encode_tree", "decode_tree", "CheckpointError"]

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
    """Write ``path`` through ``write(fileobj)`` so that it is replaced atomically or not at all.

    The file gets the permissions an ordinary ``open(path, "w")`` would give
    it: those of the file it replaces, or ``0o666`` less the umask for a new
    one.  The temporary file (``.<name>.kronlin-<pid>-XXXXXXXX.tmp``, next to
    ``path``) is removed when the write fails or is interrupted by an
    exception; temporaries left by processes that were killed (SIGKILL, power
    loss) are removed by the next write of the same ``path``
    (:func:`remove_stale_temporaries`).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path) + f"{os.getpid()}-", suffix=".tmp", dir=directory)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _new_file_mode(path))
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


def _tmp_prefix(path) -> str:
    return "." + os.path.basename(path) + ".kronlin-"


def _new_file_mode(path) -> int:
    """The mode of the file being replaced, or ``0o666`` less the process umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    mask = None
    try:  # Linux reports the umask without changing it (thread-safe)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temporaries(path) -> list:
    """Remove the temporary files of :func:`atomic_write` for ``path`` whose writer process is gone.

    Only files of our own naming (``.<name>.kronlin-<pid>-*.tmp`` next to
    ``path``) are considered, and only those whose ``<pid>`` is no running
    process; returns the paths removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _tmp_prefix(path)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process, or no way to tell: leave its file alone
        return True
    return True


def save_checkpoint(path, tree) -> None:
    """Atomically write ``tree`` (see the module docstring) to ``path`` as an ``.npz`` archive."""
    text, arrays = encode_tree(tree)
    if _TREE in arrays:  # pragma: no cover - keys are a0, a1, ...
        raise AssertionError
    members = {_TREE: np.array(text), **arrays}
    atomic_write(path, lambda f: np.savez(f, **members))


class CheckpointError(ValueError):
    """A file that is not a readable, well-formed checkpoint (the message says what is wrong)."""


_ZIP_MAGIC = b"PK\x03\x04"


def load_checkpoint(path):
    """The tree saved by :func:`save_checkpoint` (no pickle is ever loaded).

    Raises :class:`CheckpointError` (a ``ValueError``) with one line saying
    why when the file is missing, empty, not an ``.npz`` archive, truncated or
    corrupted (every member is CRC-checked), or holds members that
    :func:`save_checkpoint` does not write.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"cannot read it: {exc.strerror or exc}") from None
    with f:
        magic = f.read(4)
        if not magic:
            raise CheckpointError("the file is empty (not a kronlin.train checkpoint)")
        if magic != _ZIP_MAGIC:
            raise CheckpointError("not a kronlin.train checkpoint (not an .npz archive)")
        f.seek(0)
        return _read_tree(f)


def _read_tree(f):
    try:
        with np.load(f, allow_pickle=False) as z:
            names = z.files
            if _TREE not in names:
                raise CheckpointError(f"not a kronlin.train checkpoint (no {_TREE} member)")
            arrays = _Members({k: z[k] for k in names if k != _TREE})
            text = z[_TREE]
            if text.dtype.kind != "U" or text.ndim != 0:
                raise CheckpointError(f"not a kronlin.train checkpoint ({_TREE} is not a string)")
            tree = decode_tree(str(text), arrays)
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile, npy header, JSON and tree errors all mean a damaged file
        raise CheckpointError(f"not a kronlin.train checkpoint, or truncated or corrupted ({_reason(exc)})") from None
    extra = sorted(set(arrays) - arrays.used)
    if extra:
        raise CheckpointError(f"not a kronlin.train checkpoint (unexpected member(s) {extra})")
    return tree


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KeyError):
        text = f"missing {text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Members(dict):
    """The archive's arrays, remembering which of them the tree refers to."""

    def __init__(self, arrays):
        super().__init__(arrays)
        self.used: set = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)
