"""Hyper-parameters are type- and range-checked in one place (optim/hparams.py), from Python and from ``--hp``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kronlin.train import cli, load_task
from kronlin.train.optim import OPTIMIZERS, SGD
from kronlin.train.optim.hparams import HyperParameterError, check_hparams, integer, real

RUN = ["--task", "digits-clf", "--batch", "16", "--steps", "2", "--quiet"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_default_is_declared_and_valid(name):
    cls = OPTIMIZERS[name]
    assert set(cls.spec) == set(cls.defaults)
    cls.check_hparams(cls.defaults)


# (optimizer, --hp text, key named in the message, what the message says it accepts)
BAD = [
    ("kfac", "lam=abc", "lam", "a finite number > 0"),
    ("kfac", "momentum=maybe", "momentum", "true or false"),
    ("sgd", "momentum=maybe", "momentum", "a finite number in [0, 1)"),
    ("sgd", "nesterov=maybe", "nesterov", "true or false"),
    ("sgd", "lr=-1", "lr", "a finite number > 0"),
    ("sgd", "lr=0", "lr", "a finite number > 0"),
    ("sgd", "lr=nan", "lr", "a finite number > 0"),
    ("sgd", "lr=true", "lr", "a finite number > 0"),
    ("sgd", "reject_factor=1", "reject_factor", "(0, 1)"),
    ("adam", "beta2=1", "beta2", "[0, 1)"),
    ("adam", "eps=none", "eps", "a finite number > 0"),
    ("kfac", "T3=2.5", "T3", "an integer >= 1"),
    ("kfac", "T1=0", "T1", "an integer >= 1"),
    ("kfac", "damping=exactly", "damping", "one of 'factored', 'exact'"),
    ("kfac", "pi=-2", "pi", "one of 'trace', 'fro', 'spectral' or a finite number > 0"),
    ("kfac", "omega1=1.5", "omega1", "(or none)"),
    ("kfra", "second_factor=0", "second_factor", "true or false"),
    ("foof", "S=0", "S", "an integer >= 1 (or none)"),
    ("ngd", "labels=some", "labels", "one of 'mc', 'full'"),
    ("ngd", "samples=2.0", "samples", "an integer >= 1"),
    ("kbfgs", "mu1=1", "mu1", "(0, 1)"),
    ("kbfgs-l", "memory=-3", "memory", "an integer >= 1"),
]


@pytest.mark.parametrize("opt, hp, key, accepts", BAD, ids=[f"{o}-{h}" for o, h, _, _ in BAD])
def test_cli_refuses_bad_hp_with_one_line_and_status_2(tmp_path, capsys, opt, hp, key, accepts):
    out = tmp_path / "run.json"
    with pytest.raises(SystemExit) as e:
        cli.main(RUN + ["--opt", opt, "--hp", hp, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"hyper-parameter {key} must be" in err and accepts in err and opt in err
    assert not out.exists()


def test_cli_refuses_unknown_hp(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(RUN + ["--opt", "sgd", "--hp", "lam=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown hyper-parameter(s) ['lam']" in err and "known: ['lr'" in err


def test_compare_checks_hp_per_optimizer(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "--opts", "sgd", "adam", "--hp", "adam:beta1=maybe", "--steps", "2", "--quiet",
                  "--out-dir", str(tmp_path / "cmp")])  # fmt: skip
    assert e.value.code == 2
    assert "adam: hyper-parameter beta1 must be a finite number in [0, 1); got 'maybe' (str)" in capsys.readouterr().err


def test_bad_hp_from_a_fresh_process_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kronlin.train", *RUN, "--opt", "kfac", "--hp", "lam=abc"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "kfac: hyper-parameter lam must be a finite number > 0; got 'abc' (str)" in r.stderr


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_constructor_and_load_state_dict_check_types(name):
    task = load_task("digits-clf")
    cls = OPTIMIZERS[name]
    net = task.net_factory(np.random.default_rng(0))
    key = next(k for k, p in cls.spec.items() if p.kind in ("real", "int") and not p.optional)
    with pytest.raises(HyperParameterError, match=f"hyper-parameter {key} must be"):
        cls(net, task.loss, **{key: "abc"})
    opt = cls(net, task.loss)
    state = opt.state_dict()
    state["hparams"][key] = "abc"
    with pytest.raises(HyperParameterError, match=f"hyper-parameter {key} must be"):
        opt.load_state_dict(state)
    assert opt.hparams[key] == cls.defaults[key]  # refused before anything was changed


def test_check_hparams_accepts_and_refuses():
    spec = {"x": real(0, 1, high_open=True), "n": integer(2, optional=True)}
    check_hparams("t", spec, {"x": 0, "n": None})
    check_hparams("t", spec, {"x": np.float64(0.5), "n": np.int64(2)})
    for bad in ({"x": 1.0}, {"x": True}, {"x": float("inf")}, {"n": 1}, {"n": 2.0}, {"n": "2"}, {"y": 0}):
        with pytest.raises(HyperParameterError) as e:
            check_hparams("t", spec, bad)
        assert e.value.key == next(iter(bad))
    with pytest.raises(ValueError, match="must be a finite number > 0; got -1"):
        SGD.check_hparams({"lr": -1})
