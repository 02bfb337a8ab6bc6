"""bench/reproduce.py and bench/_repro_report.py on a tiny protocol (a few seconds)."""

import importlib.util
import json
import math
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


def _tiny(rep, task, grid_points=2, seeds=(1, 2)):
    """The task's protocol shrunk to a few iterations, each grid cut to its first ``grid_points`` values of the
    first hyper-parameter (the others: the first value)."""
    cfg = dict(rep.TASKS[task], steps=4, batch=32, eval_every=2, seeds=seeds)
    grids = {}
    for lab, e in cfg["entries"].items():
        g = rep.task_grid(task, lab)
        if g:
            keys = list(g)
            grids[lab] = {k: (g[k][:grid_points] if k == keys[0] else g[k][:1]) for k in keys}
    cfg["grids"] = grids
    cfg.pop("align", None)
    if "progress" in cfg:
        cfg["progress"] = {"seed": 1}
    return cfg


def test_tiny_protocol_and_report(tmp_path):
    rep, report = _load("reproduce"), _load("_repro_report")
    for task, seeds in (("digits-ae", (1, 2)), ("digits-conv", (1,))):
        cfg = _tiny(rep, task, seeds=seeds)
        meta = rep.run_task(task, out_dir=str(tmp_path / task), cfg=cfg, workers=1, verbose=False)
        d = tmp_path / task
        n_tune = sum(2 for lab in cfg["entries"] if cfg["entries"][lab]["grid"])
        assert len(list(d.glob("tune__*.json"))) == n_tune
        assert len(list(d.glob("run__*.json"))) == len(seeds) * len(cfg["entries"])
        # the chosen point is the tuning run with the lowest final training-set objective
        for lab, g in cfg["grids"].items():
            key = list(g)[0]
            recs = {json.loads(p.read_text())["config"]["hp"][key]: json.loads(p.read_text())
                    for p in d.glob(f"tune__{lab}-{key}*.json")}  # fmt: skip
            assert len(recs) == 2
            best = min(report.final(r) for r in recs.values())  # (tiny runs may tie, e.g. both diverged: +inf)
            assert report.final(recs[meta["chosen"][lab][key]]) == best
        # every record is evaluated on the whole training set; the paper entries carry their protocol
        r = json.loads((d / "run__kfac__s1.json").read_text())
        assert r["protocol"] == "kronlin" and r["eval"]["step"] == [0, 2, 4] and len(r["loss"]) == 4
        w = json.loads((d / "run__kbfgs-paper__s1.json").read_text())
        assert w["protocol"] == "paper" and w["config"]["hp"]["warm_start"] is True
        assert {k: w["config"]["hp"][k] for k in meta["chosen"]["kbfgs"]} == meta["chosen"]["kbfgs"]
    ae = tmp_path / "digits-ae"
    sched = json.loads((ae / "run__kfac-paper__s1.json").read_text())
    assert sched["config"]["batch_full_at"] == 4 and sched["batch_sizes"][-1] > 32
    assert sched["eval"]["train_loss_averaged"][-1] is not None  # Polyak ξ = 0.99 (§13)
    assert json.loads((ae / "run__kfra-paper__s1.json").read_text())["config"]["hp"]["T3"] == 1
    assert json.loads((ae / "progress__s1.json").read_text())["steps"] == 4
    conv = json.loads((tmp_path / "digits-conv" / "run__sgd__s1.json").read_text())
    assert conv["eval"]["test_error"][-1] is not None
    rep.run_defaults(out_dir=str(tmp_path / "defaults"), tasks={"digits-conv": 3}, workers=1, verbose=False)
    checks = [json.loads(p.read_text()) for p in (tmp_path / "defaults").glob("check__*.json")]
    assert len(checks) >= 10
    assert [c["opt"] for c in checks if "skipped" in c] == ["kfac-tridiag"]  # dense layers only
    doc = tmp_path / "docs" / "reproduction.md"
    text = report.write_report(str(tmp_path), str(doc))
    assert doc.exists() and "## At a glance" in text and "## Hyper-parameter search" in text
    assert "Not applicable: digits-conv/kfac-tridiag" in text
    for k in range(1, 6):
        assert f"| {k}. " in text and f"## Claim {k} " in text
    # a verdict per claim × task under the papers' protocols: claims 1–5 on the autoencoder, claim 5 on the CNN
    assert text.count("**digits-ae, paper's protocol: ") == 5 and text.count("**digits-conv, paper's protocol: ") == 1
    for name in ("claim1_kfac_vs_sgd", "claim3_kfra", "claim4_ngd_foof"):
        assert (ae / f"{name}.png").exists()
    assert (tmp_path / "digits-conv" / "claim5_kbfgs.png").exists()


def test_objectives_and_helpers():
    rep, report = _load("reproduce"), _load("_repro_report")
    rec = {"loss": [9.0] * 4, "seconds": [0.1, 0.2, 0.3, 0.4],
           "eval": {"every": 2, "step": [0, 2, 4], "train_loss": [10.0, 5.0, 4.0], "train_loss_averaged": [None, 6.0, 3.0]}}
    assert report.final(rec) == 4.0 and report.final(rec, averaged=True) == 3.0
    steps, secs, y = report.curve(rec, averaged=True)
    assert list(steps) == [0, 2, 4] and np.allclose(secs, [0.0, 0.2, 0.4]) and list(y) == [10.0, 5.0, 3.0]
    assert report.first_reach(rec, 5.0) == 2 and report.first_reach(rec, 1.0) is None
    bad = {"loss": [1.0], "seconds": [0.1], "eval": {"step": [0, 1], "train_loss": [1.0, float("nan")]}}
    assert report.final(bad) == math.inf
    up = {"loss": [1.0] * 2, "seconds": [0.1, 0.2], "eval": {"step": [0, 2], "train_loss": [3.0, 7.0]}}
    assert report.final(up) == math.inf and report.ms([report.final(up), 2.0]) == "2 (1 diverged)"  # above its start
    assert rep.grid_points({"a": (1, 2), "b": (3,)}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert rep.point_label("foof", {"lr": 0.1, "damping": 1.0}) == "foof-lr0.1-damping1"
    assert report._grid_suffix({"lr": 0.1, "damping": "exact"}, {"lr": (), "damping": ()}) == ""
    assert report.combine(["holds", "holds"]) == "holds" and report.combine(["holds", "does not hold"]) == "partly"
    assert report.gap_fraction(15.0, 14.0, 16.0) == 0.5
    d, sig = report.paired([0.1, 0.11, 0.09, 0.1])
    assert abs(d - 0.1) < 1e-12 and sig
    assert report.ms([1.0, float("inf")]) == "1 (1 diverged)"


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
