"""Run under ``mpiexec -n R`` by tests/train/test_train_distributed.py; writes ``rank<r>.json`` to ``$KRONLIN_MPI_OUT``.

``python dp_worker.py steps SPEC_JSON``: the training loop of ``kronlin.train``
with the optimizer on a :class:`kronlin.train.distributed.DataParallel` (the
same global batches, this rank's shard); every rank writes its per-step
decisions (loss, accepted, λ, γ), a digest of its final weights and optimizer
state, the layers it inverted at the last refresh, and rank 0 the first update
(``first.npy``).  ``SPEC["fraction"]`` is the placement (``grad_worker_fraction``); ``SPEC["overflow"]``
makes every candidate γ but the current one overflow (each step's info then counts the refusals).  :func:`trajectory` with
``dp=None`` is the single-process reference the test computes in-process.

``python dp_worker.py cli-fail ARGV_JSON``: ``kronlin.train``'s CLI with the
optimizer's third step raising on rank 1 only; the CLI must end every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys

import numpy as np


def trajectory(spec: dict, dp=None):
    """``(infos, first_update, digest)`` of ``spec["steps"]`` iterations (one process when ``dp`` is None)."""
    from kronlin.train.cli import setup, make_config

    cfg = make_config(spec["task"], spec["opt"], seed=spec.get("seed", 0), batch=spec["batch"], steps=spec["steps"],
                      hp=spec.get("hp", {}))  # fmt: skip
    task, net, data_rng, opt = setup(cfg)
    opt.dp = dp
    refused = []
    if spec.get("overflow"):
        _overflow_other_candidates(opt, refused)
    infos, first = [], None
    for it in range(cfg["steps"]):
        X, Y = task.sample_batch(cfg["batch"], data_rng)
        if dp is not None:
            X, Y = dp.shard(X, Y)
        before = net.copy_params()
        info = opt.step(X, Y)
        if it == 0:
            first = np.concatenate([(W - W0).ravel() for W, W0 in zip(net.params, before)])
        infos.append({"loss": float(info["loss"]), "accepted": bool(info["accepted"]),
                      "lambda": info.get("lambda"), "gamma": info.get("gamma")})  # fmt: skip
        if spec.get("overflow"):
            infos[-1]["refused"] = len(refused)
    state = pickle.dumps((opt.state_dict(), [np.asarray(W) for W in net.params]))
    return infos, first, hashlib.sha256(state).hexdigest(), int(opt.n_rejected)


class _Overflowing:
    """An inverse whose right-hand side is scaled to max|V| = 1e308, so that its product overflows.

    Stands for a candidate γ whose proposal leaves the float64 range: the
    inverse (kronlin's, or kronlin.distributed's under ``--distributed``) must
    refuse it with ``FloatingPointError``, on every rank, and the optimizer
    skip the candidate.  Each refusal is counted in ``refused``.
    """

    def __init__(self, inv, refused):
        self.inv, self.refused = inv, refused

    def apply(self, V_list):
        big = [V / max(float(np.max(np.abs(V))), 1e-300) * 1e308 for V in V_list]
        try:
            return self.inv.apply(big)
        except FloatingPointError:
            self.refused.append(1)
            raise


def _overflow_other_candidates(opt, refused):
    """Make every candidate γ other than the current one overflow (``spec["overflow"]``)."""
    original = opt._inverse_for

    def inverse_for(gamma):
        inv = original(gamma)
        return inv if gamma == opt.gamma else _Overflowing(inv, refused)

    opt._inverse_for = inverse_for


def main():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    mode, arg = sys.argv[1], json.loads(sys.argv[2])
    if mode == "cli-fail":
        from kronlin.train import cli
        from kronlin.train.optim.kfac import KFAC

        original = KFAC.step

        def failing(self, X, Y):
            if rank == 1 and self.iteration == 2:
                raise RuntimeError("injected failure on this rank")
            return original(self, X, Y)

        KFAC.step = failing
        sys.exit(cli.main(arg))
    from kronlin.train.distributed import DataParallel

    dp = DataParallel(comm, grad_worker_fraction=arg.get("fraction", 1.0))
    infos, first, digest, rejected = trajectory(arg, dp)
    # which layers this rank inverted at its last refresh, per sharded preconditioner
    inverted = {str(key[1:]): sorted(int(k) for k in kf.refresh_times) for key, kf in dp._kfacs.items()}
    out = os.environ["KRONLIN_MPI_OUT"]
    if rank == 0:
        np.save(os.path.join(out, "first.npy"), first)
    path = os.path.join(out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "world": comm.Get_size(), "infos": infos, "digest": digest, "rejected": rejected,
                   "inverted": inverted}, f)  # fmt: skip
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
