"""``python -m kronlin.train``: records, checkpoints, bit-exact resume, atomic writes and compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from kronlin.train import cli
from kronlin.train.checkpoint import atomic_write, decode_tree, encode_tree, load_checkpoint, save_checkpoint
from kronlin.train.optim import OPTIMIZERS, SGD

RUN = ["--task", "digits-clf", "--batch", "32", "--seed", "3", "--quiet"]


def _run(tmp_path, opt, steps, *extra, out="run.json"):
    path = tmp_path / out
    rc = cli.main(RUN + ["--opt", opt, "--steps", str(steps), "--out", str(path), *map(str, extra)])
    assert rc == 0
    return json.loads(path.read_text())


def test_record_has_exactly_steps_losses(tmp_path):
    rec = _run(tmp_path, "sgd", 7)
    assert set(rec) == {"task", "opt", "seed", "config", "loss", "seconds", "rejected"}
    assert rec["rejected"] == 0
    assert rec["task"] == "digits-clf" and rec["opt"] == "sgd" and rec["seed"] == 3
    assert len(rec["loss"]) == 7 and len(rec["seconds"]) == 7
    assert all(np.isfinite(rec["loss"])) and np.all(np.diff(rec["seconds"]) >= 0)
    assert rec["config"]["batch"] == 32 and rec["config"]["steps"] == 7
    assert rec["config"]["hparams"]["lr"] == SGD.defaults["lr"]


def test_hp_override_and_determinism(tmp_path):
    a = _run(tmp_path, "adam", 5, "--hp", "lr=3e-3", out="a.json")
    b = _run(tmp_path, "adam", 5, "--hp", "lr=3e-3", out="b.json")
    c = _run(tmp_path, "adam", 5, "--hp", "lr=3e-3", "--seed", "4", out="c.json")
    assert a["config"]["hparams"]["lr"] == 0.003 and a["config"]["hp"] == {"lr": 0.003}
    assert a["loss"] == b["loss"] and a["loss"] != c["loss"]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_checkpoint_and_resume_is_bit_exact(tmp_path, opt):
    full = _run(tmp_path, opt, 80, "--checkpoint", tmp_path / "full.npz", out="full.json")
    first = _run(tmp_path, opt, 40, "--checkpoint", tmp_path / "ck.npz", out="first.json")
    assert first["loss"] == full["loss"][:40]
    rest = _run(tmp_path, opt, 80, "--resume", tmp_path / "ck.npz", "--checkpoint", tmp_path / "ck2.npz", out="rest.json")
    assert len(rest["loss"]) == 80 and len(rest["seconds"]) == 80
    assert rest["loss"] == full["loss"]  # bit for bit
    assert rest["seconds"][:40] == first["seconds"]
    a, b = load_checkpoint(tmp_path / "full.npz"), load_checkpoint(tmp_path / "ck2.npz")
    for x, y in zip(a["params"], b["params"]):
        np.testing.assert_array_equal(x, y)
    assert a["optimizer"]["rng"] == b["optimizer"]["rng"] and a["data_rng"] == b["data_rng"]
    assert a["iteration"] == b["iteration"] == 80


def test_periodic_checkpoint_resume(tmp_path):
    full = _run(tmp_path, "sgd", 30, out="full.json")
    ck = tmp_path / "ck.npz"
    with pytest.raises(cli.Interrupted):  # stop after 12 iterations via the SIGINT path below
        _interrupt_after(tmp_path, 12, ck)
    assert load_checkpoint(ck)["iteration"] == 12
    rest = _run(tmp_path, "sgd", 30, "--resume", ck, "--checkpoint-every", 5, "--checkpoint", ck, out="rest.json")
    assert rest["loss"] == full["loss"]
    assert load_checkpoint(ck)["iteration"] == 30


def _interrupt_after(tmp_path, n, ck):
    """Run 'sgd' through run_training with a SIGINT delivered during iteration n."""
    cfg = cli.make_config("digits-clf", "sgd", seed=3, batch=32, steps=30)
    original = SGD.step

    def step(self, X, Y):
        out = original(self, X, Y)
        if self.iteration == n:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    SGD.step = step
    try:
        cli.run_training(cfg, checkpoint=ck, handle_sigint=True)
    finally:
        SGD.step = original


def test_ctrl_c_checkpoints_and_exits_130(tmp_path, monkeypatch):
    original = SGD.step

    def step(self, X, Y):
        out = original(self, X, Y)
        if self.iteration == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(SGD, "step", step)
    ck = tmp_path / "ck.npz"
    # the handler the run must put back: Python's default, or SIG_IGN where the test process was started in the
    # background by a non-interactive shell (which ignores SIGINT for it)
    before = signal.getsignal(signal.SIGINT)
    rc = cli.main(RUN + ["--opt", "sgd", "--steps", "20", "--checkpoint", str(ck), "--out", str(tmp_path / "r.json")])
    assert rc == 130
    assert not (tmp_path / "r.json").exists()  # no partial record
    assert load_checkpoint(ck)["iteration"] == 5
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_checks_config(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    _run(tmp_path, "sgd", 10, "--checkpoint", ck)
    for bad in (["--opt", "adam"], ["--opt", "sgd", "--batch", "16"], ["--opt", "sgd", "--hp", "lr=0.2"],
                ["--opt", "sgd", "--seed", "9"]):  # fmt: skip
        args = RUN + ["--steps", "20", "--resume", str(ck)] + bad
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
    assert "different configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(RUN + ["--opt", "sgd", "--steps", "5", "--resume", str(ck)])  # fewer steps than done
    assert "more than --steps" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    _run(tmp_path, "adam", 6, "--checkpoint", ck)
    good = ck.read_bytes()

    real_savez = np.savez

    def crashing_savez(f, **members):
        real_savez(f, **members)  # the whole archive is written to the temporary file ...
        f.truncate(100)  # ... torn ...
        raise OSError("simulated crash mid-write")  # ... and the process dies before the rename

    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(SystemExit):
        cli.main(RUN + ["--opt", "adam", "--steps", "12", "--resume", str(ck), "--checkpoint", str(ck)])
    monkeypatch.setattr(np, "savez", real_savez)
    assert ck.read_bytes() == good  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "run.json"]  # no temporary left behind
    # and it still resumes to the same result as an uninterrupted run
    full = _run(tmp_path, "adam", 12, out="full.json")
    rest = _run(tmp_path, "adam", 12, "--resume", ck, out="rest.json")
    assert rest["loss"] == full["loss"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def writer(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, writer)
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_text() == "new"


def test_checkpoint_tree_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "a": np.arange(6.0).reshape(2, 3),
        "i32": np.arange(3, dtype=np.int32),
        "scalar": np.float64(0.1),
        "big": 2**100 + 7,
        "f": 0.1 + 0.2,
        "nan": float("nan"),
        "list": [1, "x", None, True, (2.5, np.ones(2))],
        3: {"nested": {"__array__": "not an array"}},
        "rng": rng.bit_generator.state,
    }
    path = tmp_path / "t.npz"
    save_checkpoint(path, tree)
    back = load_checkpoint(path)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert back["i32"].dtype == np.int32 and isinstance(back["scalar"], np.float64) and back["scalar"] == 0.1
    assert back["big"] == 2**100 + 7 and back["f"] == 0.1 + 0.2 and np.isnan(back["nan"])
    assert back["list"][:4] == [1, "x", None, True] and isinstance(back["list"][4], tuple)
    assert back[3] == {"nested": {"__array__": "not an array"}}
    assert back["rng"] == tree["rng"]
    text, arrays = encode_tree({"x": np.zeros(1)})
    assert decode_tree(text, arrays)["x"].shape == (1,)
    with pytest.raises(TypeError):
        encode_tree({"bad": object()})


def test_non_finite_steps_never_reach_the_weights(tmp_path):
    # lr = 1e308 overflows the logits to inf / nan: those steps are rejected and the step size halved
    ck = tmp_path / "ck.npz"
    rec = _run(tmp_path, "sgd", 20, "--hp", "lr=1e308", "--checkpoint", ck)
    assert len(rec["loss"]) == 20
    saved = load_checkpoint(ck)
    assert all(np.all(np.isfinite(W)) for W in saved["params"])
    state = saved["optimizer"]
    assert state["n_rejected"] > 0 and state["extra"]["lr_scale"] == 0.5 ** state["n_rejected"]
    assert all(np.all(np.isfinite(v)) for v in state["extra"]["velocity"])


def test_compare_writes_plot_table_and_records(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--task", "digits-clf", "--opts", "sgd", "adam", "--steps", "6", "--batch", "32",
                   "--hp", "adam:lr=2e-3", "--hp", "weight_decay=1e-5", "--out-dir", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adam.json", "compare.md", "compare.png", "sgd.json"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| sgd | 6 |" in table and "| adam | 6 |" in table
    adam = json.loads((out / "adam.json").read_text())
    assert adam["config"]["hparams"]["lr"] == 0.002 and adam["config"]["hparams"]["weight_decay"] == 1e-5
    assert len(adam["loss"]) == 6
    assert "compare.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["compare", "--opts", "sgd", "--hp", "nonsense=1", "--out-dir", str(out), "--quiet"])


def test_threads_option(tmp_path):
    pytest.importorskip("threadpoolctl")
    rec = _run(tmp_path, "sgd", 3, "--threads", 1)
    assert len(rec["loss"]) == 3
    ref = _run(tmp_path, "sgd", 3, out="ref.json")
    assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-12)


def test_parse_hp():
    assert cli.parse_hp(["lr=1e-3", "n=10", "flag=true", "name=abc", "x=none"]) == {
        "lr": 1e-3, "n": 10, "flag": True, "name": "abc", "x": None}  # fmt: skip
    with pytest.raises(ValueError):
        cli.parse_hp(["lr"])


def test_progress_bar_lines():
    import io

    s = io.StringIO()
    bar = cli.Progress(20, "t", stream=s)
    for i in range(1, 21):
        bar.update(i, 0.5, 0.1 * i)
    bar.close()
    lines = s.getvalue().splitlines()
    assert 2 <= len(lines) <= 12 and "20/20" in lines[-1] and "loss 5.0000e-01" in lines[-1]


def test_module_entry_point(tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "kronlin.train", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0 and "--task" in r.stdout and "compare" in r.stdout
    for name in OPTIMIZERS:
        assert name in r.stdout
    r = subprocess.run([sys.executable, "-m", "kronlin.train", "compare", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0 and "--opts" in r.stdout
