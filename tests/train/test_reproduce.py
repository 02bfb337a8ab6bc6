"""bench/reproduce.py and bench/_repro_report.py on a tiny protocol (a few seconds)."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("threadpoolctl")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")


def _load(name):
    if BENCH not in sys.path:  # reproduce.py imports its sibling modules by name
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_protocol_and_report(tmp_path):
    rep, report = _load("reproduce"), _load("_repro_report")
    tune = {"sgd": ("sgd", {"lr": (0.01, 0.02)}), "foof": ("foof", {"lr": (0.1,)}), "ngd": ("ngd", {"lr": (1.0,)}),
            "kbfgs": ("kbfgs", {"lr": (0.03,)}), "kbfgs-l": ("kbfgs-l", {"lr": (0.03,), "damping": (0.3, 1.0)})}
    cfg = {"steps": 4, "batch": 32, "align": {"at": (0, 4), "probe_batch": 32, "max_params": 300, "seeds": (1,)}}
    meta = rep.run_task("digits-ae", out_dir=str(tmp_path / "digits-ae"), cfg=cfg, tune=tune, eval_seeds=(1, 2),
                        workers=1, verbose=False)
    d = tmp_path / "digits-ae"
    assert len(list(d.glob("tune__*.json"))) == 2 + 1 + 1 + 1 + 2
    assert len(list(d.glob("run__*.json"))) == 2 * (len(rep.FIXED) + len(tune))
    assert set(meta["chosen"]) == set(tune) and meta["chosen"]["kbfgs-l"][1]["damping"] in (0.3, 1.0)
    # the chosen point is the tuning run with the lowest final loss
    sgd = {json.loads(p.read_text())["config"]["hp"]["lr"]: json.loads(p.read_text()) for p in d.glob("tune__sgd-*.json")}
    best = min(sgd, key=lambda lr: rep.final_loss(sgd[lr]["loss"]))
    assert meta["chosen"]["sgd"][1] == {"lr": best}
    r = json.loads((d / "run__kfac__s2.json").read_text())
    assert {"task", "opt", "seed", "config", "loss", "seconds", "label", "rejected"} <= set(r) and len(r["loss"]) == 4
    assert [c["iteration"] for c in json.loads((d / "align__s1.json").read_text())["checkpoints"]] == [0, 4]
    rep.run_defaults(out_dir=str(tmp_path / "defaults"), tasks={"digits-conv": 3}, workers=1, verbose=False)
    checks = [json.loads(p.read_text()) for p in (tmp_path / "defaults").glob("check__*.json")]
    assert len(checks) >= 10
    assert [c["opt"] for c in checks if "skipped" in c] == ["kfac-tridiag"]  # dense layers only
    doc = tmp_path / "docs" / "reproduction.md"
    text = report.write_report(str(tmp_path), str(doc))
    assert doc.exists() and "## Summary" in text and "Hyper-parameter search" in text
    assert "Not applicable: digits-conv/kfac-tridiag" in text
    for k in range(1, 6):
        assert f"| {k}. " in text
    assert (d / "claim1_kfac_vs_sgd.png").exists() and (d / "claim3_alignment.png").exists()


def test_helpers():
    rep, report = _load("reproduce"), _load("_repro_report")
    assert np.allclose(report.smooth([4.0, 2.0, 0.0], w=2), [4.0, 3.0, 1.0])
    # after iteration 50 the trailing 25-mean holds five 5s: 5·5/25 = 1
    assert report.first_reach({"loss": [5.0] * 30 + [0.0] * 100}, 1.0) == 50
    assert report.first_reach({"loss": [5.0] * 10}, 1.0) is None
    assert rep.grid_points({"a": (1, 2), "b": (3,)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert rep.point_label("foof", {"lr": 0.1, "damping": 1.0}) == "foof-lr0.1-damping1"
    assert rep.final_loss([1.0, float("nan")], w=2) == float("inf")
    assert report.combine(["holds", "holds"]) == "holds" and report.combine(["holds", "does not hold"]) == "partly"
    assert report.gap_fraction(15.0, 14.0, 16.0) == 0.5
    d, sig = report.paired([0.1, 0.11, 0.09, 0.1])
    assert abs(d - 0.1) < 1e-12 and sig


def test_progress_line_on_stderr_and_quiet(tmp_path, capsys):
    from kronlin.train.optim import OPTIMIZERS

    rep = _load("reproduce")
    n = len(OPTIMIZERS)
    rep.run_defaults(out_dir=str(tmp_path / "a"), tasks={"digits-clf": 2}, workers=1, verbose=True)
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("reproduce defaults [") for line in err)
    assert f"] 1/{n}" in err[0] and "elapsed " in err[0] and "eta " in err[0]
    assert f"] {n}/{n}" in err[-1] and "eta 0.0s" in err[-1]
    rep.run_defaults(out_dir=str(tmp_path / "b"), tasks={"digits-clf": 2}, workers=1, verbose=False)  # --quiet
    assert capsys.readouterr().err == ""
