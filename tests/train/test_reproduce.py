"""Smoke test of bench/reproduce.py's machinery on a tiny grid (a few seconds)."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("threadpoolctl")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("kronlin_bench_reproduce", os.path.join(ROOT, "bench", "reproduce.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_grid_and_report(tmp_path):
    rep = _load()
    out = tmp_path / "repro"
    doc = tmp_path / "docs" / "reproduction.md"
    grid = {"sgd-lr0.01": ("sgd", {"lr": 0.01}), "sgd-lr0.02": ("sgd", {"lr": 0.02}), "kfac": ("kfac", {}),
            "kfac-tridiag": ("kfac-tridiag", {}), "kfac-exactdamp": ("kfac", {"damping": "exact"}), "kfra": ("kfra", {}),
            "ngd": ("ngd", {}), "foof": ("foof", {}), "kbfgs": ("kbfgs", {}), "kbfgs-l": ("kbfgs-l", {})}
    rep.run_grid(out_dir=str(out), grid=grid, seeds=(0,), steps=4, align_opts=("kfac", "kfra"), align_seeds=(0,),
                 align_at=(4,), align_max_params=270, workers=1, verbose=False)
    recs = sorted(p.name for p in out.glob("run__*.json"))
    assert len(recs) == len(grid)
    r = json.loads((out / "run__kfac__s0.json").read_text())
    assert {"task", "opt", "seed", "config", "loss", "seconds", "label"} <= set(r)
    assert len(r["loss"]) == 4
    a = json.loads((out / "align__kfra__s0.json").read_text())
    cos = a["checkpoints"][0]["cosine"]
    assert len(cos) == len(a["layers"]) > 0 and all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in cos)
    text = rep.write_report(out_dir=str(out), doc=str(doc))
    assert doc.exists() and "Claim 5" in text and "Left out" in text
    for k in range(1, 6):
        assert f"| {k} |" in text
    assert (out / "claim1_kfac_vs_sgd.png").exists()


def test_smooth_and_first_reach():
    rep = _load()
    import numpy as np

    s = rep.smooth([4.0, 2.0, 0.0], w=2)
    assert np.allclose(s, [4.0, 3.0, 1.0])
    assert rep.first_reach({"loss": [5.0] * 30 + [0.0] * 100}, 1.0) is not None
    assert rep.first_reach({"loss": [5.0] * 10}, 1.0) is None
