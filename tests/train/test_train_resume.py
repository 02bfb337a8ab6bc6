"""``--resume`` of a corrupted, truncated or foreign checkpoint: one clear line on stderr, exit status 2.

The corruptions are built from real checkpoints (SGD and K-FAC on digits-clf):
byte-level damage (empty, text, random bytes, truncation at many offsets,
flipped bytes), archive-level damage (members missing, extra, not JSON, an
``.npy`` or a pickled archive) and well-formed archives whose content is
wrong (shapes, dtypes, non-finite weights or optimizer state, another
optimizer's state, another task, a record of the wrong length).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from kronlin import FactorEstimator
from kronlin.train import cli
from kronlin.train.checkpoint import load_checkpoint, save_checkpoint

RUN = ["--task", "digits-clf", "--batch", "16", "--seed", "1", "--quiet"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """``{opt: (path, bytes)}`` of 4-iteration checkpoints."""
    d = tmp_path_factory.mktemp("good")
    out = {}
    for opt in ("sgd", "kfac"):
        path = d / f"{opt}.npz"
        assert cli.main(RUN + ["--opt", opt, "--steps", "4", "--checkpoint", str(path)]) == 0
        out[opt] = (path, path.read_bytes())
    return out


def _members(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _tree(edit):
    """A corruption that loads the checkpoint, changes its tree with ``edit(tree)`` and saves it again."""
    return ("tree", edit)


def _set(path, value):
    def edit(t):
        *head, last = path
        node = t
        for k in head:
            node = node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value(node[last]) if callable(value) else value

    return edit


_DELETE = object()


def _bytes(fn):
    return ("bytes", fn)


# name -> (optimizer of the checkpoint, corruption, words the message must contain)
CASES = {
    "empty": ("sgd", _bytes(lambda d: b""), "is empty"),
    "text": ("sgd", _bytes(lambda d: b"step,loss\n1,0.5\n"), "not a kronlin.train checkpoint"),
    "random-bytes": ("sgd", _bytes(lambda d: np.random.default_rng(0).bytes(2000)), "not a kronlin.train checkpoint"),
    **{f"truncated-at-{k}": ("sgd", _bytes(lambda d, k=k: d[: max(1, int(k * len(d)))] if k < 1 else d[:k]),
                             "not a kronlin.train checkpoint")
       for k in (2, 30, 100, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)},  # fmt: skip
    "truncated-last-byte": ("kfac", _bytes(lambda d: d[:-1]), "not a kronlin.train checkpoint"),
    **{f"flipped-at-{k}": ("kfac", _bytes(lambda d, k=k: _flip(d, int(k * len(d)))), "checkpoint")
       for k in (0.0, 0.01, 0.2, 0.5, 0.8, 0.97, 0.995)},  # fmt: skip
    "npy-not-npz": ("sgd", _bytes(lambda d: _npy(np.arange(3.0))), "not a kronlin.train checkpoint"),
    "pickled-member": ("sgd", _bytes(lambda d: _zip({**_members(d), "a0.npy": _npy(np.array([{}], dtype=object))})),
                       "not a kronlin.train checkpoint"),  # fmt: skip
    "no-tree-member": ("sgd", _bytes(lambda d: _zip({k: v for k, v in _members(d).items() if k != "__tree__.npy"})),
                       "no __tree__"),  # fmt: skip
    "missing-array-member": ("sgd", _bytes(lambda d: _zip({k: v for k, v in _members(d).items() if k != "a0.npy"})),
                             "not a kronlin.train checkpoint"),  # fmt: skip
    "extra-member": ("sgd", _bytes(lambda d: _zip({**_members(d), "zz.npy": _npy(np.ones(2))})), "unexpected member"),
    "tree-not-json": ("sgd", _bytes(lambda d: _zip({**_members(d), "__tree__.npy": _npy(np.array("{oops"))})),
                      "not a kronlin.train checkpoint"),  # fmt: skip
    "tree-a-list": ("sgd", _tree(lambda t: [1, 2]), "not a kronlin.train checkpoint"),
    "format-tag": ("sgd", _tree(_set(["format"], "other/1")), "not a kronlin.train checkpoint"),
    "no-params": ("sgd", _tree(_set(["params"], _DELETE)), "params"),
    "params-too-few": ("sgd", _tree(_set(["params"], lambda p: p[:-1])), "params"),
    "params-wrong-shape": ("sgd", _tree(_set(["params", 1], lambda W: W[:, :-1])), "params[1]"),
    "params-float32": ("sgd", _tree(_set(["params", 0], lambda W: W.astype(np.float32))), "params[0]"),
    "params-int": ("sgd", _tree(_set(["params", 2], lambda W: W.astype(np.int64))), "params[2]"),
    "params-not-array": ("sgd", _tree(_set(["params", 0], "weights")), "params[0]"),
    "params-nan": ("sgd", _tree(_set(["params", 1], lambda W: np.where(W > 0.05, np.nan, W))), "not finite"),
    "params-inf": ("kfac", _tree(_set(["params", 0, 0], lambda w: w + np.inf)), "not finite"),
    "velocity-nan": ("sgd", _tree(_set(["optimizer", "extra", "velocity", 0, 3], lambda v: v * np.nan)), "not finite"),
    "velocity-wrong-shape": ("sgd", _tree(_set(["optimizer", "extra", "velocity", 1], lambda v: v[:3])), "velocity"),
    "velocity-int": ("sgd", _tree(_set(["optimizer", "extra", "velocity", 0], lambda v: v.astype(np.int32))),
                     "velocity"),  # fmt: skip
    "lr-scale-inf": ("sgd", _tree(_set(["optimizer", "extra", "lr_scale"], float("inf"))), "not finite"),
    "optimizer-extra-key": ("sgd", _tree(_set(["optimizer", "extra", "stowaway"], 1.0)), "stowaway"),
    "optimizer-missing-extra": ("sgd", _tree(_set(["optimizer", "extra"], _DELETE)), "'extra'"),
    "optimizer-not-a-dict": ("sgd", _tree(_set(["optimizer"], [1, 2])), "must be a dict"),
    "optimizer-bad-hparam": ("sgd", _tree(_set(["optimizer", "hparams", "lr"], "fast")), "hyper-parameter lr"),
    "optimizer-of-adam": ("sgd", _tree(_set(["optimizer", "name"], "adam")), "'adam'"),
    "kfac-frozen-wrong-shape": ("kfac", _tree(_set(["optimizer", "extra", "frozen", "A_diag", 0], lambda M: M[:-1, :-1])),
                                "optimizer state"),  # fmt: skip
    "kfac-estimator-no-stats": ("kfac", _tree(_set(["optimizer", "extra", "curvature", 0, "stats"], _DELETE)), "'stats'"),
    "kfac-estimator-factor-nan": ("kfac", _tree(_set(["optimizer", "extra", "curvature", 0, "stats", "A_diag", 1],
                                                     lambda M: M * np.nan)), "NaN or infinity"),  # fmt: skip
    "kfac-lam-nan": ("kfac", _tree(_set(["optimizer", "extra", "lam"], float("nan"))), "not finite"),
    "other-task": ("sgd", _tree(_set(["config", "task"], "digits-ae")), "different configuration"),
    "iteration-negative": ("sgd", _tree(_set(["iteration"], -1)), "iteration"),
    "iteration-text": ("sgd", _tree(_set(["iteration"], "4")), "iteration"),
    "record-too-short": ("sgd", _tree(_set(["record", "loss"], lambda L: L[:-1])), "record"),
    "record-loss-text": ("sgd", _tree(_set(["record", "seconds", 0], "soon")), "record"),
    "data-rng-malformed": ("sgd", _tree(_set(["data_rng"], {"bit_generator": "PCG64"})), "sampler"),
}


def _write_case(tmp_path, good, name):
    opt, (kind, fn), _ = CASES[name]
    src, data = good[opt]
    path = tmp_path / "ck.npz"
    if kind == "bytes":
        path.write_bytes(fn(data))
    else:
        tree = load_checkpoint(src)
        edited = fn(tree)
        save_checkpoint(path, tree if edited is None else edited)
    return opt, path


@pytest.mark.parametrize("name", list(CASES))
def test_corrupt_checkpoint_is_one_line_and_status_2(tmp_path, capsys, good, name):
    opt, path = _write_case(tmp_path, good, name)
    out = tmp_path / "run.json"
    with pytest.raises(SystemExit) as e:
        cli.main(RUN + ["--opt", opt, "--steps", "8", "--resume", str(path), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m kronlin.train: error: --resume {path}: "), err
    assert CASES[name][2] in err, err
    assert not out.exists()


def test_there_are_at_least_33_kinds_of_corruption():
    assert len(CASES) >= 33


def test_missing_and_directory_paths(tmp_path, capsys):
    for path, words in ((tmp_path / "nope.npz", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(SystemExit) as e:
            cli.main(RUN + ["--opt", "sgd", "--steps", "8", "--resume", str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_the_good_checkpoints_still_resume(tmp_path, good):
    for opt, (src, _) in good.items():
        out = tmp_path / f"{opt}.json"
        assert cli.main(RUN + ["--opt", opt, "--steps", "6", "--resume", str(src), "--out", str(out)]) == 0
        assert len(json.loads(out.read_text())["loss"]) == 6


@pytest.mark.parametrize("name", ["truncated-at-0.5", "flipped-at-0.5", "text", "params-nan"])
def test_corrupt_checkpoint_from_a_fresh_process(tmp_path, good, name):
    opt, path = _write_case(tmp_path, good, name)
    r = subprocess.run([sys.executable, "-m", "kronlin.train", *RUN, "--opt", opt, "--steps", "8", "--resume", str(path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------ FactorEstimator.load_state_dict
def _estimator_state():
    rng = np.random.default_rng(0)
    est = FactorEstimator()
    est.update([rng.standard_normal((8, 3)), rng.standard_normal((8, 4))], [rng.standard_normal((8, 4)), rng.standard_normal((8, 2))])
    return est.state_dict()


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("stats"), "missing 'stats'"),
        (lambda s: s.pop("max_decay"), "missing 'max_decay'"),
        (lambda s: s.update(step="3"), "state['step'] must be an integer >= 0"),
        (lambda s: s.update(step=0), "state['step'] = 0"),
        (lambda s: s.update(max_decay=2.0), "state['max_decay']"),
        (lambda s: s.update(tridiagonal="yes"), "state['tridiagonal'] must be true or false"),
        (lambda s: s.update(stats=[1]), "state['stats'] must be None or a dict"),
        (lambda s: s["stats"].pop("G_off"), "missing 'G_off'"),
        (lambda s: s["stats"].update(A_diag=s["stats"]["A_diag"][:1]), "one matrix per layer each; got 1 and 2"),
        (lambda s: s["stats"].update(A_off=[]), "state['stats']['A_off'] must hold 1 matrices"),
        (lambda s: s["stats"]["G_diag"].__setitem__(1, np.ones((2, 3))), "G_diag[1]"),
        (lambda s: s["stats"]["A_off"].__setitem__(0, np.ones((4, 4))), "A_off[0]"),
        (lambda s: s["stats"]["A_diag"].__setitem__(0, np.ones(4)), "A_diag[0]"),
        (lambda s: s["stats"]["A_diag"].__setitem__(0, "matrix"), "A_diag[0]"),
        (lambda s: s["stats"]["G_diag"][0].__setitem__((0, 0), np.nan), "NaN"),
        (lambda s: s.update(stats=None), "state['step'] = 1"),
    ],
)
def test_factor_estimator_load_state_dict_names_the_problem(edit, words):
    state = _estimator_state()
    edit(state)
    est = FactorEstimator()
    with pytest.raises(ValueError, match="FactorEstimator.load_state_dict") as e:
        est.load_state_dict(state)
    assert words in str(e.value), str(e.value)
    assert est.step == 0  # nothing was changed


def test_factor_estimator_state_round_trips():
    state = _estimator_state()
    est = FactorEstimator(max_decay=0.5).load_state_dict(state)
    back = est.state_dict()
    assert back["step"] == 1 and back["max_decay"] == 0.95
    for k in ("A_diag", "G_diag", "A_off", "G_off"):
        for x, y in zip(back["stats"][k], state["stats"][k]):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="must be a dict"):
        FactorEstimator().load_state_dict([1])


# ------------------------------------------------ every optimizer's real checkpoints pass the checks
RESUME_CASES = [
    ("digits-clf", "sgd", []), ("digits-clf", "adam", []), ("digits-clf", "kfac", ["--hp", "polyak=0.9"]),
    ("digits-clf", "kfac", ["--hp", "damping=exact", "--hp", "T3=2", "--hp", "T2=4"]),
    ("digits-clf", "kfac-tridiag", []), ("digits-clf", "kfra", []), ("digits-clf", "kflr", ["--hp", "T3=1"]),
    ("digits-clf", "foof", ["--hp", "T=2"]), ("digits-clf", "ngd", []), ("digits-clf", "kbfgs", []),
    ("digits-clf", "kbfgs-l", ["--hp", "memory=2"]), ("digits-conv", "kfac", []), ("digits-conv", "kbfgs-l", []),
    ("digits-conv", "ngd", []),
]  # fmt: skip


@pytest.mark.parametrize("task, opt, hp", RESUME_CASES, ids=[f"{t}-{o}-{len(h)}" for t, o, h in RESUME_CASES])
def test_every_optimizers_checkpoint_resumes_bit_exactly(tmp_path, task, opt, hp):
    base = ["--task", task, "--opt", opt, "--batch", "16", "--seed", "2", "--quiet", *hp]
    ck = tmp_path / "ck.npz"
    assert cli.main(base + ["--steps", "7", "--out", str(tmp_path / "full.json")]) == 0
    assert cli.main(base + ["--steps", "4", "--checkpoint", str(ck)]) == 0
    assert cli.main(base + ["--steps", "7", "--resume", str(ck), "--out", str(tmp_path / "rest.json")]) == 0
    full, rest = (json.loads((tmp_path / f).read_text()) for f in ("full.json", "rest.json"))
    assert rest["loss"] == full["loss"]
