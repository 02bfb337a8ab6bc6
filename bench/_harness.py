"""Shared benchmark machinery: case registries and paired timing (docs/design.md §6).

The floor runs (timed here, outside pytest-benchmark's timed region) right
before every round of the operation, so each round has its own floor time and
``extra_info["paired_ratio"]`` (median over rounds of ``op_i / floor_i``) is
immune to drift and contention slower than one round.
"""

from __future__ import annotations

import random
import statistics
import time

import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before any thread limit, so the limit covers it)
import threadpoolctl


def one_thread(torch=None):
    """Pin every BLAS pool to one thread (and ``torch``, when given) and check it held; returns the threadpoolctl
    limiter (``restore_original_limits()`` undoes it).  SciPy's OpenBLAS is loaded with this module: a limit set
    before it is loaded leaves it at its default thread count."""
    limiter = threadpoolctl.threadpool_limits(limits=1)
    if torch is not None:
        torch.set_num_threads(1)
    info = threadpoolctl.threadpool_info()
    assert len(info) >= 2 and all(d.get("num_threads") == 1 for d in info), info
    return limiter


def time_paired(benchmark, target, setup, rounds, warmup, floor=None, floor_setup=None):
    """Time ``target`` with pytest-benchmark, paired with ``floor`` when given.

    ``setup``/``floor_setup`` follow ``benchmark.pedantic``'s convention (return
    ``(args, kwargs)`` or None) and run outside the timed region.
    """
    if floor is None:
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return
    floor_times = []

    def paired_setup():
        fargs = floor_setup()[0] if floor_setup is not None else ()
        t0 = time.perf_counter()
        floor(*fargs)
        floor_times.append(time.perf_counter() - t0)
        del fargs
        return setup() if setup is not None else None

    benchmark.pedantic(target, setup=paired_setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is not None:  # None when benchmarks are disabled
        op_times = list(benchmark.stats.stats.data)
        ft = floor_times[len(floor_times) - len(op_times):]  # drop the warm-up rounds
        benchmark.extra_info.update(
            paired_floor_median=statistics.median(ft),
            paired_ratio=statistics.median(o / f for o, f in zip(op_times, ft)),
        )


def case_funcs(namespace: dict) -> dict:
    """``{op: case_op}`` for every ``case_<op>`` function of a benchmark module."""
    return {name[len("case_"):]: fn for name, fn in namespace.items() if name.startswith("case_")}


def cached_case(P, op, check: bool, funcs: dict):
    """``(target, setup)`` of a case on problem ``P``; built (and checked) when ``check``, else reused."""
    if check or op not in P.cases:
        P.cases[op] = funcs[op](P)
    return P.cases[op]


def package_at(ref: str, name: str, build: bool = False):
    """The package ``kronlin/`` as of git ``ref``, imported as ``name`` beside the installed kronlin.

    ``build``: the ref's own compiled module, built from its ``csrc/`` (CMake, CPU only, this interpreter's
    pybind11): for refs whose kernels' signatures differ from this build's.  Otherwise this build's ``_C`` is
    copied in (:func:`load_package`)."""
    import io
    import os
    import subprocess
    import sys
    import tarfile
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    paths = ["kronlin"] + (["csrc", "CMakeLists.txt"] if build else [])
    archive = subprocess.run(["git", "archive", "--format=tar", ref, *paths], cwd=root, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    if build:
        import pybind11

        def cmake(*args):
            subprocess.run(["cmake", *args], check=True, capture_output=True)

        cmake("-S", str(tmp), "-B", str(tmp / "build"), "-DKRONLIN_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release",
              f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}")
        cmake("--build", str(tmp / "build"), "-j", str(os.cpu_count() or 1))
        for so in (tmp / "build").glob("_C*.so"):
            so.replace(tmp / "kronlin" / so.name)
    return load_package(tmp / "kronlin", name)


def load_package(pkg_dir, name: str):
    """Import the ``kronlin/`` folder ``pkg_dir`` of another checkout as the package ``name``, beside the installed kronlin.

    Its compiled module is the installed kronlin's ``_C`` (``kronlin.kernels.load_info()["cpu_file"]``),
    copied in when the folder has none: the before/after comparisons run on checkouts whose ``csrc/`` is
    unchanged.  Everything else of the old package is its own, used through its public names.
    """
    import glob
    import importlib.util
    import os
    import shutil
    import sys

    from kronlin import kernels

    pkg = os.fspath(pkg_dir)
    if not glob.glob(os.path.join(pkg, "_C*.so")):
        shutil.copy(kernels.load_info()["cpu_file"], pkg)
    spec = importlib.util.spec_from_file_location(name, os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    assert mod.extension_info()["cpu_extension"], f"{pkg}: the compiled module did not load"
    return mod


def shuffled_rounds(routes: dict, rounds: int, warmup: int = 0, args: tuple = (), before=None,
                    repeat: bool = False) -> dict:
    """Per-round times (seconds) of every route: each round runs each route once, in a fresh random order,
    on the same ``args``, so that the routes of one round share the machine's state (the paired ratios
    ``t_route / t_floor`` of a round are then immune to load that changes between rounds).  The first
    ``warmup`` rounds are not kept.  ``before``: called, untimed, before every timed call (e.g.
    :func:`evict_caches`).  ``repeat``: every timed call follows an untimed call of the same route, so each
    route finds its own inputs in cache, whichever arrays the other routes read."""
    times = {k: [] for k in routes}
    for r in range(warmup + rounds):
        order = list(routes)
        random.shuffle(order)
        for name in order:
            if before is not None:
                before()
            if repeat:
                routes[name](*args)
            t0 = time.perf_counter()
            routes[name](*args)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


#: evict_caches' scratch buffer (its default 32 MiB: many times this machine's L2 of 2 MiB a core)
_EVICT = None


def evict_caches(nbytes: int = 32 << 20) -> None:
    """Write ``nbytes`` of scratch memory, pushing what the last timed call left in the CPU caches out of them:
    the next call starts cold, as an optimizer's apply does after a training step's forward and backward
    passes, and no route reads inputs that another route has just brought into cache."""
    global _EVICT
    import numpy as np

    if _EVICT is None or _EVICT.nbytes != nbytes:
        _EVICT = np.zeros(nbytes // 8)
    np.add(_EVICT, 1.0, out=_EVICT)


def torch_trainer(model, pre, batches, sync=None):
    """``run(steps)``: ``steps`` cross-entropy SGD steps (lr 1e-3) of the torch ``model`` on ``batches`` (cycled),
    each preconditioned by ``pre.step()`` unless ``pre`` is None; returns seconds per step.  ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before the clock starts and before it stops."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run(steps: int) -> float:
        if sync is not None:
            sync()
        t = time.perf_counter()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if pre is not None:
                pre.step()
            opt.step()
        if sync is not None:
            sync()
        return (time.perf_counter() - t) / steps

    return run


def torch_mlp_task(sizes, N: int, device="cpu", seed: int = 0, batch_seed: int = 1, n_batches: int = 4):
    """``(model, batches)``: the ReLU MLP with layer widths ``sizes`` (weights from ``torch.manual_seed(seed)``)
    and ``n_batches`` classification batches ``(x, y)`` of ``N`` examples, all on ``device``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    g = torch.Generator(device=device).manual_seed(batch_seed)
    batches = [(torch.randn(N, sizes[0], device=device, generator=g),
                torch.randint(0, sizes[-1], (N,), device=device, generator=g)) for _ in range(n_batches)]
    return model, batches
