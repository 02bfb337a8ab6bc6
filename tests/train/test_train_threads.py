"""``python -m kronlin.train`` pins BLAS/OpenMP to one thread unless ``--threads`` says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("threadpoolctl")

_PROBE = textwrap.dedent(
    """
    import json, sys
    import threadpoolctl
    from kronlin.train import cli
    from kronlin.train.optim import SGD
    seen = []
    step = SGD.step
    def recording(self, X, Y):
        seen.append(sorted({d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"}))
        return step(self, X, Y)
    SGD.step = recording
    rc = cli.main(sys.argv[1:])
    print(json.dumps({"rc": rc, "seen": seen}))
    """
)


@pytest.mark.parametrize("extra, expected", [([], [1]), (["--threads", "1"], [1]), (["--threads", "3"], [3]),
                                             (["--threads", "0"], [2])])  # fmt: skip
def test_blas_threads_during_training(tmp_path, extra, expected):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}  # the unpinned default of 2 cores
    args = ["--task", "digits-clf", "--opt", "sgd", "--steps", "2", "--batch", "16", "--quiet", *extra]
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0 and out["seen"] == [expected, expected]


def test_negative_threads_is_a_usage_error(capsys):
    from kronlin.train import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--task", "digits-clf", "--opt", "sgd", "--steps", "2", "--threads", "-1", "--quiet"])
    assert e.value.code == 2 and "--threads must be >= 0" in capsys.readouterr().err
