"""``compare.png``: training loss against iterations and against seconds, readable where runs finish.

Each optimizer gets two lines of one colour, both in the legend of both panels:
its loss at every iteration (thin, faint) and the moving average over the
previous ``w`` iterations (bold; ``w`` is 1/50 of the run, 20 for 1000
iterations, so the bold line starts at iteration ``w``), labelled with the
average's final value.  The loss axis is logarithmic, labelled so, and
spans the range that matters: from below the lowest average to the highest
average after the first 5% of the run (the first iterations' much larger
losses are cut off); its ticks are plain numbers dense enough to tell apart
final losses such as 14.2 and 16.1 (… 14, 16, 18, 20, 25 …).
"""

from __future__ import annotations

import math

import numpy as np

from .checkpoint import atomic_write
from .data import INSTALL_TRAIN

__all__ = ["plot_records", "make_figure", "moving_average", "log_ticks", "import_matplotlib"]

#: Mantissas of the tick candidates, coarsest set first (each a superset of the one before).
_TICK_LEVELS = (
    (1.0,),
    (1.0, 2.0, 5.0),
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
    (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0),
    tuple(np.round(np.arange(1.0, 10.0, 0.1), 1)),
)


def import_matplotlib():
    """matplotlib's Agg canvas and Figure classes (``ImportError`` with the install hint when it is missing)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"compare needs matplotlib for its plot: {INSTALL_TRAIN}") from exc
    return FigureCanvasAgg, Figure


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the previous ``window`` values at each index (NaN before index ``window - 1``; non-finite → NaN)."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) < window:
        return y
    c = np.cumsum(np.insert(np.where(np.isfinite(y), y, np.nan), 0, 0.0))
    out = (c[window:] - c[:-window]) / window
    return np.concatenate([np.full(window - 1, np.nan), out])


def log_ticks(lo: float, hi: float, max_ticks: int = 12) -> list:
    """The finest "nice" tick values in ``[lo, hi]`` (``0 < lo < hi``), at most ``max_ticks`` of them."""
    best = []
    for mantissas in _TICK_LEVELS:
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
                 for m in mantissas]  # fmt: skip
        ticks = [float(f"{t:.6g}") for t in ticks if lo <= t <= hi]
        if len(ticks) > max_ticks:
            break
        best = ticks
    return best


def _y_range(curves) -> tuple[float, float]:
    """``(lo, hi)``: below the lowest average, up to the highest average after the first 5% of each run."""
    lows, highs = [], []
    for avg in curves:
        tail = avg[int(0.05 * len(avg)) :]
        tail = tail[np.isfinite(tail) & (tail > 0)]
        if len(tail):
            lows.append(tail.min())
            highs.append(tail.max())
    if not lows:
        return 0.1, 10.0
    lo, hi = min(lows) / 1.08, max(highs) * 1.08
    if hi < lo * 1.5:  # flat curves: still show some range around them
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 1.25, mid * 1.25
    return lo, hi


def plot_records(records: dict, path, title: str = "") -> None:
    """Write ``compare.png`` (see the module docstring) for ``{optimizer: record}`` to ``path``."""
    fig = make_figure(records, title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def make_figure(records: dict, title: str = ""):
    """The matplotlib ``Figure`` of :func:`plot_records`."""
    FigureCanvasAgg, Figure = import_matplotlib()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_it, ax_s = fig.subplots(1, 2, sharey=True)
    averages = []
    for i, (name, rec) in enumerate(records.items()):
        loss = np.asarray(rec["loss"], dtype=float)
        if len(loss) == 0:
            continue
        sec = np.asarray(rec["seconds"], dtype=float)
        it = np.arange(1, len(loss) + 1)
        window = max(1, len(loss) // 50)
        avg = moving_average(loss, window)
        averages.append(avg)
        final = avg[np.isfinite(avg)][-1] if np.isfinite(avg).any() else float("nan")
        what = f"{window}-iteration moving average" if window > 1 else "loss"
        for ax, x in ((ax_it, it), (ax_s, sec)):
            ax.plot(x, loss, color=f"C{i}", alpha=0.25, lw=0.8, label=f"{name}: each iteration")
            ax.plot(x, avg, color=f"C{i}", lw=1.8, label=f"{name}: {what} (final {final:.4g})")
    lo, hi = _y_range(averages)
    ticks = log_ticks(lo, hi)
    for ax, xlabel in ((ax_it, "iteration"), (ax_s, "seconds (wall time)")):
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small", loc="upper right")
    ax_it.set_ylabel("training loss (mini-batch, after the step; log scale)")
    ax_it.set_title("against iterations", fontsize="medium")
    ax_s.set_title("against wall time", fontsize="medium")
    if title:
        fig.suptitle(title + "  (the first 5% of each run lies above the plotted range)")
    return fig
