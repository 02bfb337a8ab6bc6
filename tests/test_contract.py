"""The parts of the calling contract that are not one operator's algebra (issue 11).

The per-operator contract (results, batching, pickling, snapshots, ...) is in
tests/test_conformance.py; here: caller libraries' edge cases, ``jax.jit``,
batched ``matmat``, size-0 factors, validation helpers, the import graph.
"""

from __future__ import annotations

import ast
import pathlib
import copy
import pickle

import numpy as np
import pytest

import kronlin
from kronlin import BlockDiagInverse, BlockTridiagInverse, DampedKron, Kron, KronSumInverse, WoodburyFisher

EYE3, EYE2 = np.eye(3), np.eye(2)


# -- torch -----------------------------------------------------------------------------------
def test_torch_scalar_results_are_0d_tensors():
    torch = pytest.importorskip("torch")
    K = Kron(torch.eye(3, dtype=torch.float64) * 2, torch.eye(2, dtype=torch.float64))
    for value in (K.logdet(), K.trace(), *K.slogdet(), K.eigh().logdet()):
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float64
    assert float(K.logdet()) == pytest.approx(2 * 3 * np.log(2.0))


def test_torch_in_place_update_after_construction_changes_nothing():
    """The running-average update A.mul_(2) must not reach the operator (it used to: @ saw it, solve did not)."""
    torch = pytest.importorskip("torch")
    A = torch.eye(3, dtype=torch.float64) * 2
    K = Kron(A, torch.eye(2, dtype=torch.float64))
    X = torch.ones(2, 3, dtype=torch.float64)
    K.solve(X)
    A.mul_(2)
    assert torch.allclose(K @ K.solve(X), X, rtol=0, atol=1e-14)


def test_kron_eigh_apply_hands_fn_the_callers_library():
    torch = pytest.importorskip("torch")
    A, G = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), torch.eye(2, dtype=torch.float64)
    X = torch.ones(2, 3, dtype=torch.float64)
    seen = []
    Y = Kron(A, G).eigh().apply(X, lambda d: (seen.append(type(d)), torch.exp(-d))[1])
    assert seen == [torch.Tensor]
    assert torch.allclose(Y, torch.exp(-torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).expand(2, 3))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_half_dtypes_named(dtype):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=rf"^A has dtype {dtype}; kronlin computes in float32 or float64"):
        Kron(torch.eye(3, dtype=getattr(torch, dtype)), torch.eye(2))


def test_torch_requires_grad_clear_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^A requires grad.*A\.detach\(\)"):
        Kron(torch.eye(3, dtype=torch.float64, requires_grad=True), torch.eye(2, dtype=torch.float64))
    K = Kron(torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^X requires grad"):
        K @ torch.ones(2, 3, dtype=torch.float64, requires_grad=True)


def test_mixing_a_numpy_operator_with_torch_input_is_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="X is a torch array but the operator was built from NumPy arrays"):
        Kron(EYE3, EYE2) @ torch.ones(2, 3, dtype=torch.float64)


# -- JAX ----------------------------------------------------------------------------------------
@pytest.fixture
def jnp():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    return jnp


def test_jax_read_only_buffers_and_accessors(jnp):
    K = Kron(jnp.eye(3) * 2.0, jnp.eye(2))
    assert float(jnp.max(jnp.abs(K.A - 2 * jnp.eye(3)))) == 0.0 and K.T.G.shape == (2, 2)
    assert K.logdet().shape == () and float(K.logdet()) == pytest.approx(6 * np.log(2.0))
    assert float(kronlin.WoodburyFisher([jnp.ones((3, 2))], [jnp.ones((3, 2))], 0.1).quad([jnp.ones((2, 2))])) > 0


def test_jax_jit_without_the_callback_names_it(jnp):
    import jax

    with pytest.raises(TypeError, match=r"traced JAX value.*jax.jit.*kronlin.jax_callback"):
        jax.jit(lambda A: Kron(A, jnp.eye(2)) @ jnp.ones((2, 3)))(jnp.eye(3))


def test_jax_callback_solves_under_jit(jnp):
    import jax

    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    G = rng.standard_normal((3, 3)) + 4 * np.eye(3)
    K = Kron(jnp.asarray(A), jnp.asarray(G))
    X = jnp.asarray(rng.standard_normal((2, 3, 4)))
    solve = jax.jit(kronlin.jax_callback(K, "solve"))
    want = np.linalg.solve(np.kron(A, G), np.asarray(X).transpose(0, 2, 1).reshape(2, -1).T).T
    got = solve(X)
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1).reshape(2, -1), want, rtol=1e-12, atol=1e-12)
    E = Kron(jnp.asarray(A @ A.T), jnp.asarray(G @ G.T)).eigh()
    damped = jax.jit(kronlin.jax_callback(E, "solve", damping=0.5))
    np.testing.assert_allclose(np.asarray(damped(X)), np.asarray(E.solve(X, damping=0.5)), rtol=1e-13)
    F = WoodburyFisher([jnp.asarray(rng.standard_normal((5, 4)))], [jnp.asarray(rng.standard_normal((5, 3)))], 0.3)
    U = [jnp.asarray(rng.standard_normal((3, 4)))]
    out = jax.jit(kronlin.jax_callback(F, "solve"))(U)
    assert isinstance(out, list) and np.allclose(np.asarray(out[0]), np.asarray(F.solve(U)[0]), rtol=1e-13)
    with pytest.raises(ValueError, match="method must be one of"):
        kronlin.jax_callback(K, "logdet")


# -- batched operators and matmat ---------------------------------------------------------------
def test_batched_matmat_refused_not_paired():
    """matmat on a stack of operators used to apply item j to column j; it now refuses clearly."""
    K = Kron(np.stack([EYE3, 2 * EYE3]), EYE2)
    with pytest.raises(ValueError, match=r"^matmat: a batched operator \(batch shape \(2,\)\) is a stack"):
        K.matmat(np.ones((6, 2)))
    with pytest.raises(ValueError, match=r"^rmatmat: a batched operator"):
        K.rmatmat(np.ones((6, 2)))
    with pytest.raises(ValueError, match="batched operator"):
        K.aslinearoperator()
    # @ broadcasts the batch dimensions explicitly: (2,) operators on (2, q, p)
    Y = K @ np.ones((2, 2, 3))
    np.testing.assert_array_equal(Y[1], 2 * np.ones((2, 3)))


# -- aslinearoperator on the layered operators ---------------------------------------------------
def test_block_inverses_have_aslinearoperator():
    from scipy.sparse.linalg import cg

    rng = np.random.default_rng(0)
    a = [np.concatenate([rng.standard_normal((30, d)), np.ones((30, 1))], 1) for d in (3, 4)]
    g = [rng.standard_normal((30, d)) for d in (4, 2)]
    f = kronlin.batch_factors([x[:, :-1] for x in a], g)
    for inv in (BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=0.1),
                BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"], gamma=0.1)):
        L = inv.aslinearoperator()
        D = inv.to_dense()
        b = rng.standard_normal(L.shape[0])
        np.testing.assert_allclose(L @ b, D @ b, rtol=1e-12)
        x, info = cg(L, b, rtol=1e-12, maxiter=500)  # D is SPD: cg inverts F̂⁻¹ back to F̂ b
        assert info == 0 and np.allclose(D @ x, b, rtol=1e-8, atol=1e-8)


# -- size-0 factors: one clear error for every operator ------------------------------------------
Z = np.zeros((0, 0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Kron(Z, EYE2),
        lambda: Kron(EYE3, Z),
        lambda: kronlin.KronEigh(Z, np.zeros(0), EYE2, np.ones(2)),
        lambda: DampedKron(Z, EYE2, 0.1),
        lambda: DampedKron(Z, EYE2, 0.1, mode="factored"),
        lambda: kronlin.factored_damping(Z, EYE2, 0.1),
        lambda: KronSumInverse(Z, EYE2, Z, EYE2, method="eig"),
        lambda: KronSumInverse(Z, EYE2, Z, EYE2, method="schur"),
        lambda: KronSumInverse(Z, EYE2, Z, EYE2, method="smith"),
        lambda: BlockDiagInverse([Z], [EYE2]),
        lambda: BlockTridiagInverse([EYE3, Z], [EYE2, EYE2], [np.zeros((3, 0))], [EYE2]),
        lambda: WoodburyFisher([np.ones((3, 0))], [np.ones((3, 2))], 0.1),
    ],
)
def test_size_zero_factors_one_clear_error(make):
    with pytest.raises(ValueError, match=r"kronlin operators need factors of order >= 1 \(a size-0 layer"):
        make()


# -- validation helpers ------------------------------------------------------------------------
def test_pi_errors_blame_pi():
    with pytest.raises(ValueError, match=r"^pi must be one of \('trace', 'fro', 'spectral'\); got '2.0'"):
        kronlin.factored_damping(EYE3, EYE2, 0.1, pi="2.0")
    with pytest.raises(ValueError, match=r"^pi must be one of"):
        BlockDiagInverse([EYE3], [EYE2], gamma=0.1, pi="2.0")
    with pytest.raises(TypeError, match=r"^pi must be a real scalar"):
        kronlin.factored_damping(EYE3, EYE2, 0.1, pi=True)
    with pytest.raises(ValueError, match=r"^norm must be one of"):
        kronlin.pi_factor(EYE3, EYE2, norm="2.0")


def test_per_layer_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"^A_diag\[1\] \(shape \(2, 2\)\) has trace 0 <= 0, so π is undefined"):
        BlockDiagInverse([EYE3, np.zeros((2, 2))], [EYE2, EYE2], gamma=0.1)
    with pytest.raises(ValueError, match=r"^G_diag\[0\] \(shape \(2, 2\)\) has trace"):
        BlockDiagInverse([EYE3], [np.zeros((2, 2))], gamma=0.1)


@pytest.mark.parametrize("sign", [True, False, 2, "1", None, 1.5])
def test_sign_rejects_bools_and_others(sign):
    with pytest.raises(ValueError, match=r"^sign must be \+1 or -1"):
        KronSumInverse(EYE3, EYE2, EYE3, EYE2, sign=sign)


def test_sign_accepts_plus_minus_one():
    for sign in (1, -1, 1.0, np.int64(-1)):
        assert KronSumInverse(EYE3, EYE2, 0.5 * EYE3, EYE2, sign=sign).sign == int(sign)


@pytest.mark.parametrize("bad", [True, "0.1", b"1", [0.1]])
def test_scalars_reject_bools_and_strings(bad):
    with pytest.raises(TypeError, match=r"^damping must be a real scalar"):
        DampedKron(EYE3, EYE2, bad)
    with pytest.raises(TypeError, match=r"^scale must be a real scalar"):
        WoodburyFisher([np.ones((3, 2))], [np.ones((3, 2))], 0.1, scale=bad)


def test_choices_are_checked_by_one_helper():
    for make, name in ((lambda: DampedKron(EYE3, EYE2, 0.1, mode="Exact"), "mode"),
                       (lambda: KronSumInverse(EYE3, EYE2, EYE3, EYE2, method=1), "method"),
                       (lambda: BlockTridiagInverse([EYE3], [EYE2], [], [], method="schur"), "method"),
                       (lambda: WoodburyFisher([np.ones((3, 2))], [np.ones((3, 2))], 0.1, gram_method=None),
                        "gram_method")):
        with pytest.raises(ValueError, match=rf"^{name} must be one of"):
            make()


def test_apply_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"^fn must be a function of the eigenvalue products; got NoneType"):
        Kron(EYE3, EYE2).eigh().apply(np.ones((2, 3)), None)


# -- scalar results are uniform ----------------------------------------------------------------
def test_numpy_scalar_results_are_numpy_scalars_of_the_operator_dtype():
    rng = np.random.default_rng(0)
    f32 = np.float32
    K = Kron(np.eye(3, dtype=f32) * 2, np.eye(2, dtype=f32))
    F = WoodburyFisher([rng.standard_normal((4, 3)).astype(f32)], [rng.standard_normal((4, 2)).astype(f32)], 0.1)
    values = [K.logdet(), K.trace(), *K.slogdet(), K.eigh().logdet(), F.logdet(), F.quad([np.ones((2, 3), f32)]),
              F.bilinear([np.ones((2, 3), f32)], [np.ones((2, 3), f32)]),
              BlockDiagInverse([np.eye(3, dtype=f32)], [np.eye(2, dtype=f32)], gamma=0.1).logdet(),
              KronSumInverse(np.eye(3, dtype=f32), np.eye(2, dtype=f32), np.eye(3, dtype=f32),
                             np.eye(2, dtype=f32)).logdet()]
    for v in values:
        assert isinstance(v, np.float32), type(v)


def test_block_diag_logdet_refuses_a_negative_determinant():
    G = np.diag([1.0, -1.0])  # symmetric, indefinite: LU; det(I₃ ⊗ G) = det(G)³ = -1
    with pytest.raises(np.linalg.LinAlgError, match="not positive"):
        BlockDiagInverse([EYE3], [G]).logdet()


# -- pickling of estimators and views ---------------------------------------------------------
def test_factor_estimator_pickles_and_returns_copies():
    rng = np.random.default_rng(0)
    est = kronlin.FactorEstimator().update([rng.standard_normal((8, 3))], [rng.standard_normal((8, 2))])
    est2 = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(est2.A_diag[0], est.A_diag[0])
    est.A_diag[0][...] = 0  # a copy: the running average is untouched
    assert np.all(np.diag(est.A_diag[0]) > 0)


# -- layout ---------------------------------------------------------------------------------------
def test_no_import_cycle_between_kron_and_kron_eigh():
    src = pathlib.Path(kronlin.__file__).parent
    tree = ast.parse((src / "kron_eigh.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "kron" not in imported


def test_every_public_operator_uses_the_operator_base():
    from kronlin._operator import Operator

    for cls in (Kron, kronlin.KronEigh, DampedKron, KronSumInverse, BlockDiagInverse, BlockTridiagInverse,
                WoodburyFisher):
        assert issubclass(cls, Operator), cls


@pytest.mark.parametrize("bad,exc", [(float("nan"), ValueError), (float("inf"), ValueError), ("-1", TypeError),
                                     (None, TypeError)])
def test_power_is_a_finite_real_scalar(bad, exc):
    E = Kron(EYE3, EYE2).eigh()
    with pytest.raises(exc, match=r"^power must be (finite|a real scalar)"):
        E.power(np.ones((2, 3)), bad)
    with pytest.raises(exc, match=r"^power must be"):
        E.aslinearoperator(power=bad)


@pytest.mark.parametrize("opts,match", [
    (dict(tol=float("inf")), r"^tol must be a finite positive number"),  # tol=inf returned a 66% error
    (dict(tol=float("nan")), r"^tol must be a finite positive number"),
    (dict(tol=0.0), r"^tol must be a finite positive number"),
    (dict(max_iter=float("nan")), r"^max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), r"^max_iter must be an integer >= 1"),
    (dict(max_iter=0), r"^max_iter must be an integer >= 1"),
    (dict(max_iter=True), r"^max_iter must be an integer >= 1"),
])
def test_smith_options_validated(opts, match):
    with pytest.raises(ValueError, match=match):
        KronSumInverse(EYE3, EYE2, 0.5 * EYE3, 0.5 * EYE2, method="smith", **opts)


@pytest.mark.parametrize("bad", [None, "abc", np.ones((4, 3))])
def test_lists_expected_get_a_clear_error(bad):
    with pytest.raises(TypeError, match=r"^acts must be a list with one array per layer"):
        kronlin.batch_factors(bad, [np.ones((4, 2))])
    with pytest.raises(TypeError, match=r"^A_diag must be a list with one array per layer"):
        BlockDiagInverse(bad, [EYE2])
    with pytest.raises(TypeError, match=r"^A_off must be a list with one array per layer"):
        BlockTridiagInverse([EYE3], [EYE2], bad, [])


def test_design_references_resolve():
    """Docstrings cite docs/design.md §n; every cited section exists (the old "DESIGN §n" had no document)."""
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    design = (root / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, flags=re.M))
    cited = set()
    for path in list((root / "kronlin").rglob("*.py")) + list((root / "bench").glob("*.py")):
        cited |= set(re.findall(r"docs/design\.md §(\d+)", path.read_text()))
    assert cited and cited <= sections, (cited, sections)


def _readme_section_blocks(title: str) -> list:
    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]


def test_readme_torch_and_jax_examples_run():
    """The README's "Calling kronlin from PyTorch and JAX" examples run as printed and do what they say."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    torch_block, jax_block = _readme_section_blocks("Calling kronlin from PyTorch and JAX")
    ns: dict = {}
    exec(compile(torch_block, "README.md (torch example)", "exec"), ns)  # noqa: S102 - our own README
    # the hooks saw the batch; the gradients were replaced by F̆⁻¹ applied to the joint [W | b] gradients
    inv, layers = ns["inv"], ns["layers"]
    steps = [torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1) for m in layers]
    F = torch.as_tensor(np.linalg.inv(inv.to_dense()))
    flat = torch.cat([s.T.reshape(-1) for s in steps])
    back = F @ flat
    orig = torch.cat([g.T.reshape(-1) for g in ns["grads"]])
    assert torch.allclose(back, orig, rtol=1e-8, atol=1e-10)
    ns = {}
    exec(compile(jax_block, "README.md (JAX example)", "exec"), ns)  # noqa: S102
    E, W = ns["E"], ns["W"]
    np.testing.assert_allclose(np.asarray(W), -0.1 * np.asarray(E.solve(ns["jnp"].ones((5, 20)), 1e-3)), rtol=1e-12)


def test_schur_set_up_agrees_on_signs():
    from kronlin.stein.schur import SchurStein

    with pytest.raises(ValueError, match=r"^sign must be \+1 or -1; got True"):
        SchurStein(np, EYE3, EYE2, EYE3, EYE2, True)


def test_factor_estimator_arguments_and_state_validated():
    with pytest.raises(TypeError, match=r"^max_decay must be a real scalar"):
        kronlin.FactorEstimator(max_decay="0.5")
    with pytest.raises(ValueError, match=r"^max_decay must be finite and non-negative"):
        kronlin.FactorEstimator(max_decay=float("nan"))
    with pytest.raises(ValueError, match=r"^FactorEstimator.load_state_dict: the state is missing 'stats'"):
        kronlin.FactorEstimator().load_state_dict({"step": 1, "max_decay": 0.9, "tridiagonal": True,
                                                  "append_one": True})
    with pytest.raises(ValueError, match=r"^FactorEstimator.load_state_dict: state\['stats'\] is missing 'G_diag'"):
        kronlin.FactorEstimator().load_state_dict({"step": 1, "max_decay": 0.9, "tridiagonal": True,
                                                  "append_one": True, "stats": {"A_diag": []}})
    rng = np.random.default_rng(0)
    est = kronlin.FactorEstimator().update([rng.standard_normal((8, 3))], [rng.standard_normal((8, 2))])
    state = est.state_dict()
    est2 = kronlin.FactorEstimator().load_state_dict(state)
    state["stats"]["A_diag"][0][...] = 0  # the loaded estimator owns its copy
    assert np.all(np.diag(est2.A_diag[0]) > 0) and est2.step == 1


class _COrderOnCopy(np.ndarray):
    """Copies and pickles to C order, as CuPy arrays do (cuBLAS then rounds GEMMs differently)."""

    def __deepcopy__(self, memo):
        return np.ascontiguousarray(self).view(_COrderOnCopy)

    def __reduce__(self):
        return (np.ascontiguousarray, (np.asarray(self),))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda op: pickle.loads(pickle.dumps(op))])
def test_copies_keep_fortran_ordered_arrays_fortran_ordered(clone):
    """Found on an H100: a deep-copied/unpickled KronEigh on CuPy solved to 2e-7 instead of identically,
    because CuPy copies cuSOLVER's column-major eigenvectors to C order."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    E = kronlin.Kron(A @ A.T + np.eye(6), np.eye(3)).eigh()
    E._Qa = np.asfortranarray(E._Qa).view(_COrderOnCopy)
    assert E._Qa.flags.f_contiguous and not E._Qa.flags.c_contiguous
    twin = clone(E)
    assert twin._Qa.flags.f_contiguous and not twin._Qa.flags.c_contiguous
    assert np.array_equal(np.asarray(twin._Qa), np.asarray(E._Qa))
