"""``python -m kronlin.train``: train one task with one optimizer, or compare several.

Run (the default subcommand; ``run`` may be spelled out)::

    python -m kronlin.train --task digits-ae --opt sgd --steps 200 --batch 256 --seed 0 --out run.json
    python -m kronlin.train --task digits-ae --opt adam --hp lr=3e-3 --steps 40 --checkpoint ck.npz
    python -m kronlin.train --task digits-ae --opt adam --hp lr=3e-3 --steps 80 --resume ck.npz --out run.json

The record written to ``--out`` is JSON::

    {"task", "opt", "seed", "config", "loss": [one per iteration], "seconds": [one per iteration],
     "rejected": number of rejected steps}

``loss[i]`` is the mean training loss on iteration ``i``'s mini-batch at the
parameters after the update (see :mod:`kronlin.train.optim.base`); ``seconds[i]``
the wall time since training started, after iteration ``i``; ``rejected`` the
optimizer's count of rejected (non-finite) steps, resumes included.  ``--steps``
counts all iterations, including those done before a resume, so the record
always holds exactly ``--steps`` numbers.  (A loss that is itself not finite —
possible only when a batch overflows at weights that were finite on the
previous batch — is written as JSON's ``NaN``/``Infinity``; such steps are
rejected, see :mod:`kronlin.train.optim.base`.)

BLAS/OpenMP run one thread unless ``--threads N`` says otherwise (``0``: the
libraries' default; see :mod:`kronlin._threads`).  These networks are small:
on a machine with other work running, multi-threaded BLAS made 100 K-FAC
iterations 15–25 times slower than one thread, and one thread is also what
makes timings comparable between optimizers.

Randomness: ``--seed`` is split (``numpy.random.SeedSequence``) into the
initial weights, the mini-batch sampler and the optimizer's own generator;
``--data-seed`` fixes generated data sets (``curves-ae``).

``--checkpoint PATH`` saves the weights, the optimizer's ``state_dict`` (with
its generator), the sampler's generator, the record so far and the config to
``PATH`` (atomically; see :mod:`kronlin.train.checkpoint`) at the end, every
``--checkpoint-every`` iterations, and when the run is interrupted (Ctrl-C
stops at the end of the current iteration).  ``--resume PATH`` continues a run
bit for bit as if it had never stopped; its task, optimizer, seeds, batch size,
data options and ``--hp`` overrides must match the command line.  A checkpoint
that is damaged (truncated, flipped bytes, not an archive), that holds weights
or optimizer state that are not finite, or whose contents do not fit the run
(see :mod:`kronlin.train.resume`) is refused with one line on stderr and exit
status 2, like every other usage error.

``--distributed`` (under ``mpiexec -n R``; kfac, kfac-tridiag, kfra, kflr, foof, ngd):
every rank draws the same global batch and steps on its rows, with every
batch reduction all-reduced (:mod:`kronlin.train.distributed`), so the run
equals the single-process one up to rounding; each layer's inversion is done
by one rank (the cost model's assignment) and shared per ``--placement``
(``comm-opt``: inverses broadcast; ``mem-opt``: the owner preconditions and
broadcasts the step; or a fraction ``k/R``); rank 0 reads ``--resume`` and
writes ``--out`` and the checkpoints (resumable on any number of ranks); a
failure on one rank aborts all of them.

Compare::

    python -m kronlin.train compare --task digits-ae --opts kfac sgd --steps 1000 --out-dir results/

runs each optimizer on the task with the same seed and writes, into
``--out-dir`` (default ``kronlin-out/`` in the current directory, created only
once every argument has been checked), ``<opt>.json``
records, ``compare.png`` (loss against iterations and against seconds) and
``compare.md`` (a Markdown table).  ``--hp key=value`` applies to every
optimizer that has the hyper-parameter, ``--hp opt:key=value`` to one.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import signal
import sys
import time
from fractions import Fraction

import numpy as np

from .._threads import DEFAULT_THREADS, thread_limit
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .data import TASKS, load_task
from .optim import OPTIMIZERS, get_optimizer
from .plot import import_matplotlib, plot_records
from .progress import Progress
from .resume import checkpoint_tree, restore
from .resume import jsonable as _jsonable

__all__ = ["main", "run_training", "run_compare", "parse_hp", "Progress", "make_config", "setup", "draw_batches",
           "evaluate", "batch_size_at"]

PROG = "python -m kronlin.train"

DEFAULT_STEPS = 200
DEFAULT_BATCH = 256
COMPARE_DEFAULT_TASK = "digits-ae"
COMPARE_DEFAULT_STEPS = 1000  # kfac + sgd on digits-ae: about 20-30 s on 2 cores (one BLAS thread)
COMPARE_DEFAULT_OUT = "kronlin-out"  # ignored by the repository's .gitignore
COMPARE_DEFAULT_OPTS = ("kfac", "sgd")  # falls back to sgd, adam while kfac is not registered


# --------------------------------------------------------------------- helpers
def parse_value(text: str):
    """``"1e-3"`` → 0.001, ``"10"`` → 10, ``"true"`` → True, ``"none"`` → None, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_hp(items) -> dict:
    """``["lr=0.1", "momentum=0.5"]`` → ``{"lr": 0.1, "momentum": 0.5}`` (keys may carry an ``opt:`` prefix)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def write_json(path, obj) -> None:
    """Atomically write ``obj`` as JSON."""
    text = json.dumps(_jsonable(obj), indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


class _StopFlag:
    """Turns the first SIGINT into a request to stop after the current iteration.

    SIGTERM ends the run at once, but as an exception (``SystemExit(143)``), so
    that a checkpoint being written removes its temporary file.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and _in_main_thread()
        self.requested = False
        self._old = None
        self._old_term = None

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._old_term = signal.signal(signal.SIGTERM, _terminate)
        return self

    def _handler(self, signum, frame):
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\ninterrupt: stopping after this iteration (Ctrl-C again to abort)\n")

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)
            signal.signal(signal.SIGTERM, self._old_term)
        return False


def _terminate(signum, frame):
    sys.stderr.write("\nterminated\n")
    raise SystemExit(128 + signum)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Interrupted(Exception):
    """Raised by :func:`run_training` when a run was stopped by Ctrl-C (after checkpointing)."""

    def __init__(self, done: int, checkpoint):
        super().__init__(f"interrupted after {done} iterations")
        self.done, self.checkpoint = done, checkpoint


# -------------------------------------------------------------------- training
def make_config(task, opt, *, seed=0, data_seed=0, batch=DEFAULT_BATCH, steps=DEFAULT_STEPS, hp=None, data=None,
                batch_full_at=None) -> dict:  # fmt: skip
    """The run configuration (what a checkpoint records and a resume checks).

    ``batch_full_at`` = K turns on K-FAC §13's exponentially growing mini-batch
    (:func:`batch_size_at`), starting from ``batch``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    get_optimizer(opt).check_hparams(dict(hp or {}))
    if int(steps) < 0 or int(batch) < 1:
        raise ValueError(f"need steps >= 0 and batch >= 1; got steps={steps}, batch={batch}")
    if batch_full_at is not None and (isinstance(batch_full_at, bool) or not isinstance(batch_full_at, int)
                                      or batch_full_at < 2):  # fmt: skip
        raise ValueError(f"the batch schedule's full-batch iteration must be an integer >= 2; got {batch_full_at!r}")
    return {
        "task": task,
        "opt": opt,
        "seed": int(seed),
        "data_seed": int(data_seed),
        "batch": int(batch),
        "steps": int(steps),
        "hp": dict(hp or {}),
        "data": dict(data or {}),
        "batch_full_at": batch_full_at,
    }


def batch_size_at(k: int, batch: int, n_train: int, full_at=None) -> int:
    """The mini-batch size of iteration ``k`` (1-based).

    Fixed at ``batch`` unless ``full_at`` = K is given: then K-FAC §13's
    schedule ``m_k = min(m₁ exp((k − 1)/b), n)`` with ``m₁ = batch`` and ``b``
    chosen so that ``m_K = n`` (the paper: m₁ = 1000, K = 500), rounded to
    the nearest integer.
    """
    if full_at is None or batch >= n_train:
        return min(batch, n_train) if full_at is not None else batch
    b = (full_at - 1) / math.log(n_train / batch)
    return min(int(round(batch * math.exp((k - 1) / b))), n_train)


def setup(config):
    """``(task, net, data_rng, opt)`` of a run configuration (:func:`make_config`), as training starts.

    The seed is split into three independent streams (initial weights, mini-batches, the optimizer's
    own randomness), so a run is determined by ``config`` alone; experiments that follow a training
    trajectory step by step (bench/'s reproduction) start from here.
    """
    task = load_task(config["task"], config["data_seed"], **config["data"])
    init_ss, data_ss, opt_ss = np.random.SeedSequence(config["seed"]).spawn(3)
    net = task.net_factory(np.random.default_rng(init_ss))
    data_rng = np.random.default_rng(data_ss)
    opt_seed = int(opt_ss.generate_state(1, np.uint32)[0])
    opt = get_optimizer(config["opt"])(net, task.loss, seed=opt_seed, **config["hp"])
    return task, net, data_rng, opt


def evaluate(task, net, params=None) -> dict:
    """The objective on the whole training set (and the test set, if the task holds one out).

    This is what the papers report (K-FAC §13, Botev §6, Benzing §5, Ren et al. §5), rather than the
    mini-batch loss a step sees: ``train_loss`` (the mean loss over all training examples, at the current
    weights), and with a held-out set ``test_loss``; for classifiers also ``train_error`` and
    ``test_error`` (the fraction of wrongly classified examples).  ``params`` evaluates other weights
    than the network's (an averaged iterate).
    """
    out = {}
    for part, X, Y in (("train", task.X_train, task.Y_train), ("test", task.X_test, task.Y_test)):
        if X is None:
            continue
        logits = net.forward(X, params).out
        out[f"{part}_loss"] = task.loss.value(logits, Y)
        if task.is_classifier:
            out[f"{part}_error"] = float(np.mean(np.argmax(logits, axis=1) != Y))
    return out


def _evaluate_into(record, it, task, net, opt) -> float:
    """Append the evaluation at iteration ``it`` to ``record["eval"]``; return the seconds it took.

    With Polyak averaging (K-FAC §13, ``polyak=ξ``) the averaged iterate is evaluated too (keys ending in
    ``_averaged``; ``None`` before the first step); the paper reports the lower of the two training
    objectives.
    """
    t0 = time.perf_counter()
    ev = record["eval"]
    if ev["step"] and ev["step"][-1] == it:
        return 0.0
    ev["step"].append(it)
    values = evaluate(task, net)
    avg = getattr(opt, "averaged_params", None)
    if avg is not None:
        values.update({f"{k}_averaged": v for k, v in evaluate(task, net, avg).items()})
    for key in set(values) | (set(ev) - {"every", "step"}):
        ev.setdefault(key, [None] * (len(ev["step"]) - 1)).append(values.get(key))
    return time.perf_counter() - t0


def run_training(
    config: dict,
    *,
    resume=None,
    checkpoint=None,
    checkpoint_every: int = 0,
    progress: bool = False,
    handle_sigint: bool = False,
    out=None,
    label: str | None = None,
    dp=None,
    eval_every: int = 0,
) -> dict:
    """Train as ``config`` (from :func:`make_config`) says and return the record.

    ``eval_every`` = K > 0 adds ``record["eval"]``: :func:`evaluate` (the whole training set's objective,
    the held-out set's, classification errors) before the first step, after every K-th and after the
    last; its time is left out of ``record["seconds"]``.

    ``resume``/``checkpoint`` are checkpoint paths; ``out`` a JSON path for the
    record.  With ``handle_sigint`` the first Ctrl-C stops at the end of an
    iteration, writes the checkpoint (if any) and raises :class:`Interrupted`.

    ``dp`` (a :class:`kronlin.train.distributed.DataParallel`, under
    ``mpiexec``): every rank draws the same global batches and steps on its
    shard; rank 0 alone reads the checkpoint to resume from (and broadcasts
    it), writes checkpoints and ``out`` and shows progress.
    """
    task, net, data_rng, opt = setup(config)
    steps = config["steps"]
    if dp is not None:
        opt.check_distributed()
        if min(config["batch"], task.n_train) < dp.size:
            raise ValueError(f"--distributed: the batch ({min(config['batch'], task.n_train)} examples) must hold at "
                             f"least one example per rank ({dp.size} ranks)")  # fmt: skip
        opt.dp = dp
        if dp.rank != 0:
            checkpoint = out = None
            progress = False
        handle_sigint = False  # under mpiexec a signal reaches every rank at a different iteration
    if resume is not None:
        try:
            if dp is None:
                tree = load_checkpoint(resume)
            else:  # rank 0 reads; every rank gets the tree or the same error
                got = None
                if dp.rank == 0:
                    try:
                        got = ("ok", load_checkpoint(resume))
                    except Exception as exc:  # noqa: BLE001 - every rank must learn it (no rank left in bcast)
                        got = ("error", str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}")
                got = dp.bcast(got)
                if got[0] == "error":
                    raise CheckpointError(got[1])
                tree = got[1]
            record = restore(tree, config, net, opt, data_rng, task.sample_batch)
        except CheckpointError as exc:
            raise CheckpointError(f"--resume {resume}: {exc}") from None
    else:
        record = {"task": config["task"], "opt": config["opt"], "seed": config["seed"], "config": None,
                  "loss": [], "seconds": []}  # fmt: skip
        t0 = time.perf_counter()
        if opt.prepare(task.X_train, config["batch"]):  # e.g. K-BFGS's warm start; kept out of the step times, as in the papers
            record["prepare_seconds"] = time.perf_counter() - t0
    record["config"] = {
        "batch": config["batch"],
        "steps": steps,
        "data_seed": config["data_seed"],
        "data": config["data"],
        "hp": config["hp"],
        "hparams": _jsonable(opt.hparams),
        "n_params": net.n_params,
        "n_train": task.n_train,
    }
    if dp is not None:
        record["config"]["ranks"] = dp.size
        record["config"]["grad_worker_fraction"] = dp.grad_worker_fraction
    if config.get("batch_full_at") is not None:
        record["config"]["batch_full_at"] = config["batch_full_at"]
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0; got {eval_every}")
    if eval_every and (dp is None or dp.rank == 0):
        record.setdefault("eval", {"every": eval_every, "step": []})["every"] = eval_every
    else:
        eval_every = 0
    start = len(record["loss"])
    offset = record["seconds"][-1] if start else 0.0
    bar = Progress(steps, label or f"{config['task']}/{config['opt']}", enabled=progress)

    def save():
        record["rejected"] = int(opt.n_rejected)
        if checkpoint is not None:
            save_checkpoint(checkpoint, checkpoint_tree(config, net, opt, data_rng, record))

    if dp is not None:  # a failure on one rank must end every rank (the others wait in a collective)
        try:
            return _train_loop(config, task, net, data_rng, opt, record, start, offset, bar, save, handle_sigint,
                               checkpoint, checkpoint_every, out, dp, eval_every)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - ends every rank
            bar.close()
            dp.abort(f"{PROG}: error: {type(exc).__name__}: {exc}")
    return _train_loop(config, task, net, data_rng, opt, record, start, offset, bar, save, handle_sigint,
                       checkpoint, checkpoint_every, out, dp, eval_every)  # fmt: skip


def draw_batches(task, batch: int, rng, count: int = 1):
    """``count`` independent mini-batches of ``batch`` examples, concatenated (one draw when ``count`` is 1)."""
    if count == 1:
        return task.sample_batch(batch, rng)
    parts = [task.sample_batch(batch, rng) for _ in range(count)]
    return np.concatenate([X for X, _ in parts]), np.concatenate([Y for _, Y in parts])


def _train_loop(config, task, net, data_rng, opt, record, start, offset, bar, save, handle_sigint, checkpoint,
                checkpoint_every, out, dp, eval_every):  # fmt: skip
    steps = config["steps"]
    if eval_every:
        _evaluate_into(record, start, task, net, opt)
    t0 = time.perf_counter()
    with _StopFlag(handle_sigint) as stop:
        for it in range(start, steps):
            m = batch_size_at(it + 1, config["batch"], task.n_train, config.get("batch_full_at"))
            X, Y = draw_batches(task, m, data_rng, opt.batches_per_step)
            if config.get("batch_full_at") is not None:
                record.setdefault("batch_sizes", []).append(m)
            if dp is not None:
                X, Y = dp.shard(X, Y)
            info = opt.step(X, Y)
            record["loss"].append(float(info["loss"]))
            record["seconds"].append(offset + time.perf_counter() - t0)
            done = it + 1
            if eval_every and (done % eval_every == 0 or done == steps):
                t0 += _evaluate_into(record, done, task, net, opt)  # not part of the training time
            bar.update(done, record["loss"][-1], record["seconds"][-1] - offset, start=start)
            if stop.requested and done < steps:
                bar.close()
                save()
                raise Interrupted(done, checkpoint)
            if checkpoint_every and done % checkpoint_every == 0 and done < steps:
                save()
        bar.close()
        save()
        if out is not None:
            write_json(out, record)
    return record


# --------------------------------------------------------------------- compare
def _split_hp(hp: dict, opts) -> dict:
    per = {o: {} for o in opts}
    for key, value in hp.items():
        name, sep, k = key.partition(":")
        if sep:
            if name not in per:
                raise ValueError(f"--hp {key}=...: {name!r} is not among --opts {list(opts)}")
            per[name][k] = value
        else:
            takers = [o for o in opts if key in get_optimizer(o).defaults]
            if not takers:
                raise ValueError(f"--hp {key}=...: no optimizer among {list(opts)} has a hyper-parameter {key!r}")
            for o in takers:
                per[o][key] = value
    return per


def summary_table(records: dict) -> str:
    """A Markdown table of final/best losses and times for ``{opt: record}``."""
    lines = [
        "| optimizer | iterations | final loss | mean of last 10% | best loss | seconds | ms / iteration |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rec in records.items():
        loss, sec = np.asarray(rec["loss"], dtype=float), np.asarray(rec["seconds"], dtype=float)
        n = len(loss)
        if n == 0:
            lines.append(f"| {name} | 0 | – | – | – | – | – |")
            continue
        tail = loss[-max(1, n // 10) :]
        lines.append(
            f"| {name} | {n} | {loss[-1]:.4g} | {np.mean(tail):.4g} | {np.nanmin(loss):.4g} | "
            f"{sec[-1]:.2f} | {1000 * sec[-1] / n:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run_compare(task, opts, *, steps, batch, seed=0, data_seed=0, hp=None, data=None, out_dir=".", progress=False) -> dict:
    """Run every optimizer in ``opts`` on ``task``; write records, ``compare.png`` and ``compare.md`` to ``out_dir``."""
    opts = list(dict.fromkeys(opts))
    per = _split_hp(dict(hp or {}), opts)
    configs = {name: make_config(task, name, seed=seed, data_seed=data_seed, batch=batch, steps=steps, hp=per[name],
                                 data=data) for name in opts}  # fmt: skip
    for cfg in configs.values():  # every optimizer accepts the task's network (before any output exists)
        setup(cfg)
    import_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    records = {}
    for k, (name, cfg) in enumerate(configs.items(), 1):
        records[name] = run_training(cfg, progress=progress, out=os.path.join(out_dir, f"{name}.json"),
                                     label=f"{task}/{name} (optimizer {k} of {len(configs)})")  # fmt: skip
    title = f"{task}: batch {batch}, seed {seed}"
    plot_records(records, os.path.join(out_dir, "compare.png"), title)
    table = f"## {title}\n\n" + summary_table(records)
    atomic_write(os.path.join(out_dir, "compare.md"), lambda f: f.write(table.encode()))
    return records


# ------------------------------------------------------------------ arguments
def _common(p: argparse.ArgumentParser, *, steps_default, batch_default) -> None:
    p.add_argument("--steps", type=int, default=steps_default, help="total iterations (default %(default)s)")
    p.add_argument("--batch", type=int, default=batch_default, help="mini-batch size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and optimizer (default 0)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of generated data, curves-ae (default 0)")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. n=2000 (curves-ae images) or activation=logistic")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"BLAS/OpenMP threads (default {DEFAULT_THREADS}: these networks are small, and more threads "
                   "on a busy machine make them many times slower; 0: the libraries' default)")  # fmt: skip


def _hp_epilog() -> str:
    lines = ["hyper-parameters (--hp KEY=VALUE) and their defaults:"]
    for name in sorted(OPTIMIZERS):
        defaults = getattr(OPTIMIZERS[name], "defaults", {})
        lines.append(f"  {name}: " + ", ".join(f"{k}={v!r}" for k, v in defaults.items()))
    return "\n".join(lines)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a kronlin.train task with one optimizer and write a JSON record. "
        f"See also '{PROG} compare --help' to compare several optimizers.",
        epilog=_hp_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--opt", required=True, choices=sorted(OPTIMIZERS))
    _common(p, steps_default=DEFAULT_STEPS, batch_default=DEFAULT_BATCH)
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="hyper-parameter override, e.g. lr=0.01")
    p.add_argument("--out", metavar="PATH", help="write the JSON record here")
    p.add_argument("--checkpoint", metavar="PATH", help="write a checkpoint here (atomically)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                   help="also checkpoint every K iterations (default: only at the end and on Ctrl-C)")  # fmt: skip
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint")
    p.add_argument("--batch-full-at", type=int, default=None, metavar="K",
                   help="K-FAC §13's exponentially growing mini-batch: m_k = min(m_1·exp((k-1)/b), n) from "
                   "m_1 = --batch, reaching the whole training set at iteration K (record key 'batch_sizes')")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="evaluate the whole training set's objective (and the held-out set's, task option "
                   "holdout=F; errors for classifiers) before the first step, every K iterations and at the end "
                   "(record key 'eval'; not counted in the step times)")  # fmt: skip
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI: run under 'mpiexec -n R'; each global batch is split over the "
                   "ranks and the steps equal the single-process run's (rank 0 writes --out and --checkpoint)")  # fmt: skip
    p.add_argument("--placement", default="comm-opt", metavar="comm-opt|mem-opt|F",
                   help="with --distributed: where each layer's inverse lives (KAISA's placements; every layer is "
                   "inverted by one rank chosen by the cost model): 'comm-opt' (default) broadcasts the inverses to "
                   "every rank, 'mem-opt' keeps them on their owner, which preconditions its layers and broadcasts "
                   "the step, or a gradient-worker fraction F = k/R with k dividing R")  # fmt: skip
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} compare",
        description="Run several optimizers on one task; write their records, a plot and a Markdown table.",
        epilog=_hp_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_opts = list(COMPARE_DEFAULT_OPTS) if all(o in OPTIMIZERS for o in COMPARE_DEFAULT_OPTS) else ["sgd", "adam"]
    p.add_argument("--task", default=COMPARE_DEFAULT_TASK, choices=TASKS, help="default %(default)s")
    p.add_argument("--opts", nargs="+", default=default_opts, choices=sorted(OPTIMIZERS),
                   help="default: " + " ".join(default_opts))  # fmt: skip
    _common(p, steps_default=COMPARE_DEFAULT_STEPS, batch_default=DEFAULT_BATCH)
    p.add_argument("--hp", action="append", default=[], metavar="[OPT:]KEY=VALUE",
                   help="hyper-parameter override for every optimizer that has KEY, or only for OPT")  # fmt: skip
    p.add_argument("--out-dir", default=COMPARE_DEFAULT_OUT, help="output folder (default %(default)s, "
                   "in the current directory; created only once the arguments are valid)")  # fmt: skip
    return p


def _thread_limit(p, n):
    """The context pinning BLAS/OpenMP to ``--threads`` (default :data:`DEFAULT_THREADS`); usage errors exit 2."""
    try:
        limit, _ = thread_limit(DEFAULT_THREADS if n is None else n, required=n is not None)
    except (ValueError, RuntimeError) as exc:
        p.error(str(exc))
    return limit


def _run_main(argv) -> int:
    p = run_parser()
    args = p.parse_args(argv)
    with _thread_limit(p, args.threads):
        return _run_args(p, args)


def _grad_worker_fraction(placement: str, size: int) -> float:
    """``--placement``'s gradient-worker fraction: comm-opt 1, mem-opt 1/size, or the number given."""
    if placement == "comm-opt":
        return 1.0
    if placement == "mem-opt":
        return 1.0 / size
    try:
        return float(Fraction(placement))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--placement must be 'comm-opt', 'mem-opt' or a fraction k/R; got {placement!r}") from None


def _data_parallel():
    """The :class:`DataParallel` of ``MPI.COMM_WORLD``; ``ValueError``/``ImportError`` when not under ``mpiexec``."""
    from .distributed import DataParallel, launched_by_mpiexec

    try:
        from ..distributed._comm import mpi

        MPI = mpi()
    except ImportError as exc:
        raise ImportError(f"--distributed: {exc}") from None
    if not launched_by_mpiexec():
        raise ValueError("--distributed must be launched by an MPI launcher: mpiexec -n R python -m kronlin.train "
                         "... --distributed (mpiexec comes with pip install \".[mpi]\" in the kronlin source folder)")  # fmt: skip
    return DataParallel(MPI.COMM_WORLD)


def _run_args(p, args) -> int:
    dp = None
    try:
        if args.distributed:
            dp = _data_parallel()
            try:
                dp.set_placement(_grad_worker_fraction(args.placement, dp.size))
            except ValueError as exc:
                raise ValueError(f"--placement {args.placement}: {exc}") from None
        elif args.placement != "comm-opt":
            raise ValueError("--placement needs --distributed")
        cfg = make_config(args.task, args.opt, seed=args.seed, data_seed=args.data_seed, batch=args.batch,
                          steps=args.steps, hp=parse_hp(args.hp), data=parse_hp(args.data),
                          batch_full_at=args.batch_full_at)  # fmt: skip
        if args.checkpoint_every < 0:
            raise ValueError("--checkpoint-every must be >= 0")
        if args.eval_every < 0:
            raise ValueError("--eval-every must be >= 0")
        for flag, path in (("--out", args.out), ("--checkpoint", args.checkpoint)):
            folder = os.path.dirname(os.path.abspath(path)) if path else None
            if folder and not os.path.isdir(folder):
                raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
        rec = run_training(cfg, resume=args.resume, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                           progress=not args.quiet, handle_sigint=True, out=args.out, dp=dp,
                           eval_every=args.eval_every)  # fmt: skip
    except Interrupted as exc:
        where = f"; resume with --resume {exc.checkpoint}" if exc.checkpoint else " (no --checkpoint given)"
        print(f"interrupted after {exc.done} iterations{where}", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as exc:
        # under mpiexec these arise before training, the same on every rank: rank 0 says it, all exit 2
        p.exit(2, f"{PROG}: error: {exc}\n" if dp is None or dp.rank == 0 else None)
    if dp is not None and dp.rank != 0:
        return 0
    if rec["loss"]:
        print(f"{cfg['task']} / {cfg['opt']}: {len(rec['loss'])} iterations, final loss {rec['loss'][-1]:.6g}, "
              f"{rec['seconds'][-1]:.2f} s")  # fmt: skip
    return 0


def _compare_main(argv) -> int:
    p = compare_parser()
    args = p.parse_args(argv)
    with _thread_limit(p, args.threads):
        return _compare_args(p, args)


def _compare_args(p, args) -> int:
    try:
        recs = run_compare(args.task, args.opts, steps=args.steps, batch=args.batch, seed=args.seed,
                           data_seed=args.data_seed, hp=parse_hp(args.hp), data=parse_hp(args.data),
                           out_dir=args.out_dir, progress=not args.quiet)  # fmt: skip
    except (ValueError, OSError, ImportError) as exc:
        p.exit(2, f"{PROG} compare: error: {exc}\n")
    print(summary_table(recs), end="")
    print(f"wrote {args.out_dir}/compare.png, compare.md and one JSON record per optimizer")
    return 0


def main(argv=None) -> int:
    """Entry point: ``compare ...`` or (``run``) ``--task ... --opt ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return _run_main(argv)
