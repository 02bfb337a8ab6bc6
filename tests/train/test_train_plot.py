"""compare.png: a labelled log axis whose ticks tell the final losses apart, an explained moving average, two legends."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from kronlin.train.plot import log_ticks, make_figure, moving_average  # noqa: E402


def _record(final: float, n: int = 1000, seed: int = 0) -> dict:
    """A loss falling from about 45 to ``final``, with noise, 10 ms per iteration."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = final + 30 * np.exp(-t / 30) + 0.2 * rng.standard_normal(n)
    return {"loss": list(loss), "seconds": list(0.01 * (t + 1))}


def test_the_figure_shows_and_explains_what_matters():
    fig = make_figure({"kfac": _record(14.2), "sgd": _record(16.1, seed=1)}, "digits-ae")
    ax_it, ax_s = fig.axes
    assert "log scale" in ax_it.get_ylabel() and ax_it.get_yscale() == "log"
    lo, hi = ax_it.get_ylim()
    assert lo < 14.0 and 16.5 < hi < 30  # the finish is in range; the first iterations' ~45 are cut off
    ticks = [float(t) for t in ax_it.get_yticks() if lo <= t <= hi]
    labels = [t.get_text() for t in ax_it.get_yticklabels()]
    assert any(13.5 <= t <= 14.6 for t in ticks) and any(15.5 <= t <= 16.6 for t in ticks)  # 14.2 vs 16.1 readable
    assert all("10^" not in s and "times" not in s for s in labels)
    for ax in (ax_it, ax_s):  # a legend on both panels, explaining both kinds of line
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "kfac: each iteration" in texts
        assert any(t.startswith("kfac: 20-iteration moving average (final 14.") for t in texts)
        assert any(t.startswith("sgd: 20-iteration moving average (final 16.") for t in texts)


@pytest.mark.parametrize("lo, hi", [(13.2, 28.0), (0.011, 0.9), (2.0, 2000.0), (95.0, 130.0)])
def test_log_ticks_are_nice_dense_and_in_range(lo, hi):
    ticks = log_ticks(lo, hi)
    assert 3 <= len(ticks) <= 12 and all(lo <= t <= hi for t in ticks) and ticks == sorted(ticks)
    assert max(np.diff(np.log10([lo, *ticks, hi]))) <= 0.4  # no gap wider than 2.5x (a 1-2-5 series)


def test_moving_average_is_trailing():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [np.nan, 2.0, 4.0, 6.0])
