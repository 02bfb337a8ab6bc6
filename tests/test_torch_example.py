"""The runnable example trains, prints its table and writes its plot (a few steps only)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from kronlin.torch import example  # noqa: E402
from torch_helpers import single_thread  # noqa: E402,F401


def test_example_runs_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "plot.png"
    results = example.main(["--steps", "12", "--batch", "32", "--out", str(out), "--methods", "SGD,KFAC,NaturalGradient"])
    text = capsys.readouterr().out
    for name in ("SGD", "KFAC", "NaturalGradient", "MLP", "CNN", "ms/step"):
        assert name in text
    assert out.stat().st_size > 1000
    assert set(results) == {(m, o) for m in ("MLP", "CNN") for o in ("SGD", "KFAC", "NaturalGradient")}
    for r in results.values():
        assert len(r["losses"]) == 12 and 0.0 <= r["test_acc"] <= 1.0
