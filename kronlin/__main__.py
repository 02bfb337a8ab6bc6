"""``python -m kronlin``: the package self-check.

Solves random problems with every public method, compares each result with
dense NumPy/SciPy and times it against the dense solve (see
:mod:`kronlin._selfcheck`).  Exits 0 when every check passes, 1 otherwise.

Examples
--------
::

    python -m kronlin            # full run: sizes 8x5, 64x48, 256x192
    python -m kronlin --quick    # small sizes only, a few seconds
    python -m kronlin --seed 3
    python -m kronlin --threads 2  # BLAS/OpenMP threads (default 1; 0: the libraries' default)
"""

from __future__ import annotations

import argparse
import sys

from ._selfcheck import DEFAULT_SIZES, QUICK_SIZES, run
from ._threads import DEFAULT_THREADS


def _sizes_text(sizes) -> str:
    return ", ".join(f"{p}x{q}" for p, q in sizes)


def main(argv=None) -> int:
    """Parse the command line, run the self-check, and return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 when every check passed, 1 otherwise.
    """
    parser = argparse.ArgumentParser(
        prog="python -m kronlin",
        description=(
            "kronlin self-check: run every public method on random problems, compare with dense "
            "NumPy/SciPy (float64 and float32) and time it against the dense solve."
        ),
        epilog="Exit status 0 when all checks pass, 1 otherwise. Training adapters: python -m kronlin.train --help",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of numpy.random.default_rng (default 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes only ({_sizes_text(QUICK_SIZES)} instead of {_sizes_text(DEFAULT_SIZES)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"BLAS/OpenMP threads (default {DEFAULT_THREADS}: these sizes are small, and a second thread on a busy "
        "machine makes them many times slower; 0: the libraries' default)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 0:
        parser.error("--threads must be >= 0")
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    try:
        ok = run(sizes=sizes, seed=args.seed, threads=args.threads)
    except RuntimeError as exc:  # --threads without threadpoolctl
        parser.error(str(exc))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        sys.stdout = None
        sys.exit(1)
