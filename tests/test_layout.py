"""The layout shows the architecture (issue 11 item 5): bench/ uses kronlin through public names only.

The benchmarks are kronlin's first outside user: what they need (the compiled
kernels and their references, the extension switch, what was loaded) has a
public home, :mod:`kronlin.kernels`, and the operators' public methods.  The
check reads every ``bench/*.py`` as Python (comments and prose in strings do
not count) and refuses

* an import of a private kronlin module or name: ``import kronlin._ext``,
  ``from kronlin._kernels.x import y``, ``from kronlin import _linalg``,
  ``from kronlin.train.cli import _setup``;
* an attribute path through one: ``kronlin._ext.cpu()``, ``kernels._x``;
* a string naming one, as handed to ``sys.modules`` or ``importlib``
  (``"kronlin._ext"``);
* a call of a private method on an object, ``F._gt(...)``, ``opt._tikhonov(...)``
  (bench cannot tell a kronlin object from another by name; ``self``/``cls`` are
  the benchmark's own classes).

Docstrings of kronlin cite modules and files by path; those paths resolve.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_FILES = sorted((ROOT / "bench").glob("*.py"))


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _dotted(node) -> list | None:
    """``a.b.c`` as ``["a", "b", "c"]``, or None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def private_uses(source: str, filename: str = "<bench>") -> list:
    """``(line, what)`` for every use of a private kronlin name in ``source`` (see the module docstring)."""
    tree = ast.parse(source, filename)
    kronlin_names = {"kronlin"}  # local names bound to kronlin or one of its modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kronlin":
                    if any(_private(p) for p in alias.name.split(".")):
                        found.append((node.lineno, f"import {alias.name}"))
                    kronlin_names.add(alias.asname or "kronlin")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kronlin":
            for alias in node.names:
                if any(_private(p) for p in node.module.split(".")) or _private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                kronlin_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = _dotted(node)
            if chain is not None and chain[0] in kronlin_names:
                found.append((node.lineno, ".".join(chain)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _private(node.func.attr):
            owner = node.func.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append((node.lineno, f"call of private method .{node.func.attr}()"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"kronlin(\.\w+)*", node.value) and any(_private(p) for p in node.value.split(".")):
                found.append((node.lineno, f"the string {node.value!r}"))
    return sorted(set(found))


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_bench_uses_public_names_only(path):
    uses = {what for _, what in private_uses(path.read_text(), str(path))}
    assert not uses, f"{path.name} uses private kronlin names (give them a public home): {sorted(uses)}"


@pytest.mark.parametrize("path", [p for p in BENCH_FILES if "threadpool_limits" in p.read_text()], ids=lambda p: p.name)
def test_bench_loads_scipy_blas_before_pinning_threads(path):
    """threadpoolctl limits only the thread pools loaded when the limit is set; the core's decompositions run in
    SciPy's own OpenBLAS, which loads on first use.  A benchmark that pins threads must import scipy.linalg at
    module level first (the torch and distributed benchmarks ran an unpinned second pool before this test)."""
    tree = ast.parse(path.read_text())
    top = [a.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
           for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])]  # fmt: skip
    assert any(n == "scipy.linalg" or n.startswith("scipy.linalg") for n in top) or "kronlin.torch" in top or \
        "kronlin.train" in " ".join(top), f"{path.name} pins threads but does not import scipy.linalg at module level"


@pytest.mark.parametrize("source, n", [
    ("import kronlin._ext\nkronlin._ext.cpu()", 2),
    ("from kronlin._kernels.eig_scale import eig_scale", 1),
    ("from kronlin import _linalg", 1),
    ("from kronlin.train.cli import _setup", 1),
    ("import kronlin\nkronlin._ext.disabled()", 1),
    ("from kronlin import kernels as k\nk._ext", 1),
    ("F = kronlin.WoodburyFisher(a, e, 1.0)\nF._gt([u])\nF._factorized()", 2),
    ("import sys\nsys.modules.get('kronlin._ext')", 1),
    # public names, dunders, the benchmark's own helpers, other libraries' attributes
    ("import kronlin\nfrom kronlin import kernels\nkronlin.__version__\nkernels.compiled(np)", 0),
    ("class P:\n    def f(self):\n        return self._spd(1)", 0),
    ("K._input_covariances", 0),
    ("print('kronlin._C.eig_scale called directly')", 0),
])
def test_private_use_detection(source, n):
    """The check itself: it finds what it must and nothing else (so the test above cannot pass vacuously)."""
    assert len(private_uses(source)) == n, private_uses(source)


def _cited_modules():
    cited = set()
    for path in (ROOT / "kronlin").rglob("*.py"):
        cited |= {(path.name, m) for m in re.findall(r":(?:mod|class|func|data):`~?(kronlin(?:\.\w+)+)`", path.read_text())}
    return sorted(cited)


@pytest.mark.parametrize("where, name", _cited_modules())
def test_docstring_references_resolve(where, name):
    """``:mod:``/``:class:``/``:func:`` references to ``kronlin.…`` in docstrings name something that exists."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{where}: {name} does not resolve ({attr!r} missing)"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{where}: {name} does not resolve")


def test_docstring_file_paths_resolve():
    """Paths ``kronlin/….py``, ``tests/….py``, ``bench/….py`` and ``docs/….md`` cited in kronlin's sources exist."""
    missing = []
    for path in (ROOT / "kronlin").rglob("*.py"):
        for cited in re.findall(r"\b((?:kronlin|tests|bench|docs|csrc)/[\w/.-]*\w\.(?:py|md|cpp|cu|h))\b", path.read_text()):
            if "<" not in cited and not (ROOT / cited).exists():
                missing.append((path.relative_to(ROOT).as_posix(), cited))
    assert not missing, missing
