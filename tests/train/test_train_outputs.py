"""Output files: permissions follow the umask, no temporary file outlives a write, killed or not."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kronlin.train import cli
from kronlin.train.checkpoint import atomic_write, load_checkpoint, remove_stale_temporaries

RUN = ["--task", "digits-clf", "--batch", "16", "--seed", "1", "--quiet"]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    ck, out, cmp_dir = tmp_path / "ck.npz", tmp_path / "run.json", tmp_path / "cmp"
    assert cli.main(RUN + ["--opt", "sgd", "--steps", "3", "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert cli.main(["compare", "--task", "digits-clf", "--opts", "sgd", "--steps", "3", "--batch", "16", "--quiet",
                     "--out-dir", str(cmp_dir)]) == 0  # fmt: skip
    for path in (ck, out, *cmp_dir.iterdir()):
        assert _mode(path) == 0o666 & ~mask, (path.name, oct(_mode(path)))


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "f.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_text() == "new" and _mode(p) == 0o640


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this id (until the system reuses it)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    ck = tmp_path / "ck.npz"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".ck.npz.kronlin-{dead}-abcd1234.tmp"
    busy = tmp_path / f".ck.npz.kronlin-{alive}-efgh5678.tmp"  # a writer that is still running
    other = tmp_path / ".ck.npz.abcd1234.tmp"  # not of our naming
    neighbour = tmp_path / f".other.npz.kronlin-{dead}-abcd1234.tmp"  # another target's
    for p in (stale, busy, other, neighbour):
        p.write_bytes(b"partial")
    assert cli.main(RUN + ["--opt", "sgd", "--steps", "2", "--checkpoint", str(ck)]) == 0
    assert not stale.exists()
    assert busy.exists() and other.exists() and neighbour.exists()
    assert remove_stale_temporaries(tmp_path / "other.npz") == [str(neighbour)]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from kronlin.train import cli
    real = np.savez
    def slow_savez(f, **members):
        real(f, **members)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here, mid-write, before the rename
    np.savez = slow_savez
    cli.main(sys.argv[1:])
    """
)


def test_a_killed_write_leaves_no_temporary_after_the_next_run(tmp_path):
    ck = tmp_path / "ck.npz"
    args = RUN + ["--opt", "sgd", "--steps", "3", "--checkpoint", str(ck)]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "writing"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(leftovers) == 1 and leftovers[0].startswith(".ck.npz.kronlin-")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # SIGKILL: nothing could clean up
    assert not ck.exists()
    assert cli.main(args) == 0  # the next run of the same command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]
    assert load_checkpoint(ck)["iteration"] == 3


def test_sigterm_during_a_write_removes_the_temporary(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    real = np.savez

    def savez_then_sigterm(f, **members):
        real(f, **members)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(np, "savez", savez_then_sigterm)
    with pytest.raises(SystemExit) as e:
        cli.main(RUN + ["--opt", "sgd", "--steps", "3", "--checkpoint", str(ck)])
    assert e.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----------------------------------------------------------------- where outputs go, and when
def test_compare_writes_into_kronlin_out_of_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", "--task", "digits-clf", "--opts", "sgd", "--steps", "2", "--batch", "16", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kronlin-out"]
    assert sorted(p.name for p in (tmp_path / "kronlin-out").iterdir()) == ["compare.md", "compare.png", "sgd.json"]
    assert "wrote kronlin-out/compare.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--steps", "-1"], "need steps >= 0"),
        (["--batch", "0"], "batch >= 1"),
        (["--hp", "lr=-1"], "hyper-parameter lr"),
        (["--hp", "nonsense=1"], "no optimizer among"),
        (["--data", "colour=red"], "unknown task option"),
        (["--task", "digits-conv", "--opts", "sgd", "kfac-tridiag"], "needs a network of dense layers"),
    ],
)
def test_compare_usage_errors_create_no_output_folder(tmp_path, monkeypatch, capsys, bad, words):
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--task", "digits-clf", "--opts", "sgd", "--steps", "2", "--quiet", *bad]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_an_output_in_a_missing_folder_before_training(tmp_path, capsys, monkeypatch):
    from kronlin.train.optim import SGD

    monkeypatch.setattr(SGD, "step", lambda *a: pytest.fail("trained before checking --out"))
    for flag in ("--out", "--checkpoint"):
        with pytest.raises(SystemExit) as e:
            cli.main(RUN + ["--opt", "sgd", "--steps", "2", flag, str(tmp_path / "missing" / "f")])
        assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_missing_scikit_learn_names_the_readme_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # "import sklearn.datasets" now fails
    with pytest.raises(SystemExit) as e:
        cli.main(RUN + ["--opt", "sgd", "--steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scikit-learn" in err and 'pip install ".[train]"' in err, err


def test_compare_shows_progress_on_stderr_unless_quiet(tmp_path, capsys):
    base = ["compare", "--task", "digits-clf", "--opts", "sgd", "adam", "--steps", "20", "--batch", "16",
            "--out-dir", str(tmp_path / "cmp")]  # fmt: skip
    assert cli.main(base) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert any(line.startswith("digits-clf/sgd (optimizer 1 of 2) [") for line in err)
    assert err[-1].startswith("digits-clf/adam (optimizer 2 of 2) [") and "20/20" in err[-1]
    assert all("elapsed " in line and " eta " in line for line in err)
    assert "elapsed" not in captured.out  # the table goes to stdout, progress to stderr
    assert cli.main(base + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""
