"""What a training checkpoint holds, and the checks a resume makes before trusting it.

A checkpoint (written by :func:`kronlin.train.checkpoint.save_checkpoint`) is
the tree of :func:`checkpoint_tree`.  :func:`restore` puts it back into a
freshly set-up network, optimizer and sampler, and refuses — with a
:class:`~kronlin.train.checkpoint.CheckpointError` naming the entry — anything
that a run of the same configuration could not have written:

* another format, task, optimizer, seed, batch size, data option or ``--hp``;
* weights that are not one float64 array of the network's shape per layer,
  or that are not finite;
* an optimizer state that its ``load_state_dict`` refuses, that does not come
  back unchanged from ``state_dict()`` (missing, extra or ill-typed entries),
  whose arrays differ in shape or dtype from the fresh optimizer's, or whose
  numbers are not finite;
* a sampler state the generator refuses, or a record that does not hold one
  loss and one time per iteration;
* a state whose pieces do not fit together (say, K-FAC factors of another
  network): one trial step on copies of the restored network, optimizer and
  sampler must run, so that such a state fails here, not mid-run.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np

from .checkpoint import CheckpointError

__all__ = ["CHECKPOINT_FORMAT", "RESUME_KEYS", "checkpoint_tree", "restore", "jsonable"]

CHECKPOINT_FORMAT = "kronlin.train-checkpoint/1"
#: Settings that must agree between a checkpoint and the command line resuming it.
RESUME_KEYS = ("task", "opt", "seed", "data_seed", "batch", "data", "hp", "batch_full_at")
_TOP_KEYS = {"format", "config", "iteration", "params", "optimizer", "data_rng", "record"}


def jsonable(x):
    """``x`` with NumPy scalars/arrays and tuples turned into what JSON holds (dict keys as strings)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def checkpoint_tree(config, net, opt, data_rng, record) -> dict:
    """Everything a resume needs (see the module docstring)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": {k: config[k] for k in RESUME_KEYS},
        "iteration": len(record["loss"]),
        "params": [W.copy() for W in net.params],
        "optimizer": opt.state_dict(),
        "data_rng": data_rng.bit_generator.state,
        "record": record,
    }


def restore(ckpt, config, net, opt, data_rng, sample_batch) -> dict:
    """Load ``ckpt`` into ``net``, ``opt`` and ``data_rng`` after checking it; return the record so far.

    ``sample_batch(n, rng)`` is the task's sampler: the restored state is
    tried on one step, on copies of everything, so that pieces which do not
    fit together (e.g. factors of another network) are refused here rather
    than failing mid-run.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("not a kronlin.train checkpoint (format tag missing or different)")
    missing = sorted(_TOP_KEYS - set(ckpt))
    if missing:
        raise CheckpointError(f"corrupt checkpoint: no {', '.join(missing)} entry")
    saved = ckpt["config"]
    if not isinstance(saved, dict):
        raise CheckpointError("corrupt checkpoint: its config is not a dict")
    diff = [k for k in RESUME_KEYS if jsonable(saved.get(k)) != jsonable(config[k])]
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs command line {config[k]!r}" for k in diff)
        raise CheckpointError(f"the checkpoint was made with a different configuration ({detail})")
    done = ckpt["iteration"]
    if isinstance(done, bool) or not isinstance(done, int) or done < 0:
        raise CheckpointError(f"corrupt checkpoint: iteration must be an integer >= 0; got {done!r}")
    if done > config["steps"]:
        raise CheckpointError(f"the checkpoint already has {done} iterations, more than --steps {config['steps']}")
    record = _check_record(ckpt["record"], done)
    params = _check_params(ckpt["params"], net.params)
    _load_optimizer(opt, ckpt["optimizer"])
    try:
        data_rng.bit_generator.state = ckpt["data_rng"]
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"corrupt checkpoint: its sampler state is malformed ({_describe(exc)})") from None
    net.set_params(params)
    _probe_step(net, opt, data_rng, sample_batch, config["batch"])
    return record


def _probe_step(net, opt, data_rng, sample_batch, batch) -> None:
    """One step of a copy of the restored optimizer, network and sampler (the originals are untouched)."""
    net2, rng2 = copy.deepcopy(net), copy.deepcopy(data_rng)
    state = opt.state_dict()
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt2 = type(opt)(net2, opt.loss, seed=opt.seed, **state["hparams"])
            opt2.load_state_dict(state)
            opt2.step(*sample_batch(batch, rng2))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, np.linalg.LinAlgError) as exc:
        raise CheckpointError(f"its optimizer state does not fit this network: a trial step fails ({_describe(exc)})") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc}"
    return f"{type(exc).__name__}: {exc}"


def _check_record(record, done: int) -> dict:
    if not isinstance(record, dict):
        raise CheckpointError("corrupt checkpoint: its record is not a dict")
    for key in ("loss", "seconds"):
        values = record.get(key)
        if not isinstance(values, list) or len(values) != done:
            raise CheckpointError(f"corrupt checkpoint: its record does not hold one {key} value per iteration ({done})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"corrupt checkpoint: its record's {key} values are not all numbers")
    ev = record.get("eval")
    if ev is not None and not (isinstance(ev, dict) and isinstance(ev.get("step"), list)):
        raise CheckpointError("corrupt checkpoint: its record's eval entry is not a dict with a step list")
    return record


def _check_params(params, reference) -> list:
    if not isinstance(params, list) or len(params) != len(reference):
        n = len(params) if isinstance(params, list) else type(params).__name__
        raise CheckpointError(f"corrupt checkpoint: params must be a list of {len(reference)} weight arrays; got {n}")
    for i, (W, R) in enumerate(zip(params, reference)):
        if not isinstance(W, np.ndarray):
            raise CheckpointError(f"corrupt checkpoint: params[{i}] is a {type(W).__name__}, not an array")
        if W.dtype != R.dtype or W.shape != R.shape:
            raise CheckpointError(
                f"corrupt checkpoint: params[{i}] is {W.dtype} of shape {W.shape}; layer {i} needs {R.dtype} {R.shape}"
            )
        bad = int(np.count_nonzero(~np.isfinite(W)))
        if bad:
            raise CheckpointError(f"params[{i}] is not finite ({bad} NaN/Inf entries); refusing to resume from it")
    return params


def _load_optimizer(opt, state) -> None:
    fresh = opt.state_dict()
    try:
        opt.load_state_dict(copy.deepcopy(state))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, np.linalg.LinAlgError) as exc:
        raise CheckpointError(f"its optimizer state does not load: {_describe(exc)}") from None
    # the state must come back as it was saved (nothing ignored or converted), with the fresh optimizer's
    # array shapes and dtypes where it has arrays, and only finite numbers
    problem = _compare(state, opt.state_dict(), "optimizer") or _compare_shapes(state, fresh, "optimizer")
    problem = problem or _non_finite(state, "optimizer")
    if problem:
        raise CheckpointError(f"its optimizer state is not one this optimizer writes: {problem}")


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return type(a) is type(b) and a == b


def _compare(saved, back, where) -> str | None:
    """Where ``saved`` and ``back`` (its round trip) differ, in words; ``None`` if they agree bit for bit."""
    if isinstance(saved, dict) and isinstance(back, dict):
        for k in saved:
            if k not in back:
                return f"{where}.{k} is not a known entry"
        for k in back:
            if k not in saved:
                return f"{where}.{k} is missing"
        return next((p for k in saved if (p := _compare(saved[k], back[k], f"{where}.{k}"))), None)
    if isinstance(saved, (list, tuple)) and isinstance(back, (list, tuple)):
        if len(saved) != len(back) or type(saved) is not type(back):
            return f"{where} has the wrong length or kind"
        return next((p for i, (a, b) in enumerate(zip(saved, back)) if (p := _compare(a, b, f"{where}[{i}]"))), None)
    if isinstance(saved, np.ndarray) or isinstance(back, np.ndarray):
        if not (isinstance(saved, np.ndarray) and isinstance(back, np.ndarray)):
            return f"{where} is not an array"
        if saved.dtype != back.dtype or saved.shape != back.shape:
            return f"{where} is {saved.dtype} {saved.shape}, loaded as {back.dtype} {back.shape}"
        if not np.array_equal(saved, back, equal_nan=saved.dtype.kind in "fc"):
            return f"{where} does not load unchanged"
        return None
    if isinstance(saved, np.generic) or isinstance(back, np.generic):
        return None if type(saved) is type(back) and np.array_equal(saved, back, equal_nan=True) else f"{where} differs"
    return None if _same_value(saved, back) else f"{where} is {saved!r}, loaded as {back!r}"


def _compare_shapes(saved, fresh, where) -> str | None:
    """Where both hold an array, ``saved``'s must have ``fresh``'s shape and dtype."""
    if isinstance(saved, dict) and isinstance(fresh, dict):
        return next((p for k in saved if k in fresh and (p := _compare_shapes(saved[k], fresh[k], f"{where}.{k}"))), None)
    if isinstance(saved, (list, tuple)) and isinstance(fresh, (list, tuple)):
        if len(saved) != len(fresh) and all(isinstance(v, np.ndarray) for v in (*saved, *fresh)):
            return f"{where} holds {len(saved)} arrays; this network needs {len(fresh)}"
        return next((p for i, (a, b) in enumerate(zip(saved, fresh)) if (p := _compare_shapes(a, b, f"{where}[{i}]"))), None)
    if isinstance(saved, np.ndarray) and isinstance(fresh, np.ndarray):
        if saved.dtype != fresh.dtype or saved.shape != fresh.shape:
            return f"{where} is {saved.dtype} {saved.shape}; this network needs {fresh.dtype} {fresh.shape}"
    return None


def _non_finite(tree, where) -> str | None:
    if isinstance(tree, dict):
        return next((p for k, v in tree.items() if (p := _non_finite(v, f"{where}.{k}"))), None)
    if isinstance(tree, (list, tuple)):
        return next((p for i, v in enumerate(tree) if (p := _non_finite(v, f"{where}[{i}]"))), None)
    if isinstance(tree, (float, np.floating)) or (isinstance(tree, np.ndarray) and tree.dtype.kind in "fc"):
        if not np.all(np.isfinite(tree)):
            return f"{where} is not finite"
    return None
