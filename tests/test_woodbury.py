"""WoodburyFisher against dense per-example gradients (materialised here only), kernels, validation.

The reference: every per-example gradient ``g_c`` (column ``c = i*S + s``) is
formed explicitly as a ``(d_out, d_in)`` matrix, column-stacked (docs/design.md §1) and
concatenated over layers into the dense ``P × M`` matrix ``G``; then
``F = scale · G Gᵀ`` and every operation is checked against NumPy/SciPy on the
dense matrix.

Tolerances: float64 results agree to 1e-10 relative (max-abs error over the
max-abs reference) with ``cond(λI + F) <= 1e3``.  float32 computes everything
(Gram, Cholesky, GEMMs) in float32: products and the Gram to 1e-4, solves and
samples to ``cond · eps32 · 100 ≈ 1e-3`` (cond ≈ 1e2 in those tests), and the
log-determinant to 1e-4 relative (a sum of P logs in float32).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import scipy.linalg

import kronlin
from kronlin import WoodburyFisher, _ext
from kronlin._kernels.woodbury_gram import (
    choose_method,
    gram_dense,
    gram_shared,
    gram_shared_grad,
    gram_shared_reference,
    shared_costs,
    use_kernel,
)
from kronlin.testing import gradient_matrix, layers_vec, per_example_data, per_example_grads

from helpers import krylov, linear_operator, native, on, rel_err, to_np

F64_TOL = 1e-10
F32_PROD_TOL = 1e-4
F32_SOLVE_TOL = 2e-3

# network specs: ("dense", d_in, d_out) or ("shared", T, d_in, d_out)
NETS = {
    "dense": [("dense", 7, 5), ("dense", 6, 3)],
    "shared": [("shared", 9, 4, 3), ("shared", 17, 3, 2)],
    "mixed": [("shared", 6, 5, 4), ("dense", 8, 6), ("dense", 7, 3)],
}


# -- the dense reference: kronlin.testing's per-example gradients (P x M), F = scale·G Gᵀ ----------
def layer_shapes(spec):
    return [(ly[-1], ly[-2]) for ly in spec]


def flat(Us):
    return layers_vec([to_np(u) for u in Us])


def dense_F(acts, errs, scale=None):
    G = gradient_matrix(acts, errs)
    N = np.asarray(acts[0]).shape[0]
    s = 1.0 / N if scale is None else scale
    return s * G @ G.T, G, s


def rand_U(rng, shapes, lead=()):
    return [rng.standard_normal(lead + s) for s in shapes]


def damping_for(F, cond):
    """λ with cond(λI + F) = cond."""
    return float(np.linalg.eigvalsh(F)[-1]) / (cond - 1.0)


# -- against the dense matrix ------------------------------------------------------------
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("net", list(NETS))
def test_all_operations_match_dense_float64(xp, net, S):
    rng = np.random.default_rng([len(net), S])
    spec = NETS[net]
    N = 5
    acts, errs = per_example_data(rng, spec, N, S)
    Fd, G, s = dense_F(acts, errs)
    lam = damping_for(Fd, 1e3)
    F = WoodburyFisher([on(xp, a) for a in acts], [on(xp, e) for e in errs], lam)
    P = Fd.shape[0]
    assert F.n_params == P and F.n_columns == N * S and F.shape == (P, P)
    U = rand_U(rng, layer_shapes(spec))
    V = rand_U(rng, layer_shapes(spec))
    u, v = flat(U), flat(V)
    Ux, Vx = list(on(xp, *U)), list(on(xp, *V))

    K = F.gram()
    assert type(K) is type(Ux[0]) and K.dtype == Ux[0].dtype
    assert rel_err(K, s * G.T @ G) < F64_TOL
    assert rel_err(flat(F.matvec(Ux)), Fd @ u) < F64_TOL
    assert rel_err(F.quad(Ux), u @ Fd @ u) < F64_TOL
    assert rel_err(F.bilinear(Ux, Vx), u @ Fd @ v) < F64_TOL
    Mdense = Fd + lam * np.eye(P)
    X = F.solve(Ux)
    assert [tuple(x.shape) for x in X] == layer_shapes(spec)
    assert rel_err(flat(X), scipy.linalg.solve(Mdense, u, assume_a="pos")) < F64_TOL
    assert rel_err(F.logdet(), np.linalg.slogdet(Mdense)[1]) < F64_TOL


@pytest.mark.parametrize("net", list(NETS))
def test_float32_with_looser_tolerances(xp, net):
    rng = np.random.default_rng(7)
    spec = NETS[net]
    acts, errs = per_example_data(rng, spec, 6, 2)
    Fd, G, s = dense_F(acts, errs)
    lam = damping_for(Fd, 1e2)
    F = WoodburyFisher([on(xp, a, dtype="float32") for a in acts], [on(xp, e, dtype="float32") for e in errs], lam)
    U = rand_U(rng, layer_shapes(spec))
    Ux = [on(xp, x, dtype="float32") for x in U]
    u = flat(U)
    assert F.dtype == Ux[0].dtype
    assert rel_err(F.gram(), s * G.T @ G) < F32_PROD_TOL
    assert rel_err(flat(F.matvec(Ux)), Fd @ u) < F32_PROD_TOL
    assert rel_err(F.quad(Ux), u @ Fd @ u) < F32_PROD_TOL
    X = F.solve(Ux)
    assert all(x.dtype == Ux[0].dtype for x in X)
    Mdense = Fd + lam * np.eye(Fd.shape[0])
    assert rel_err(flat(X), np.linalg.solve(Mdense, u)) < F32_SOLVE_TOL
    assert rel_err(F.logdet(), np.linalg.slogdet(Mdense)[1]) < F32_PROD_TOL


def test_solve_residual_equation_and_flat_and_batched_rhs():
    rng = np.random.default_rng(3)
    spec = NETS["mixed"]
    acts, errs = per_example_data(rng, spec, 4, 2)
    Fd, _, _ = dense_F(acts, errs)
    F = WoodburyFisher(acts, errs, 0.05)
    shapes = layer_shapes(spec)
    U = rand_U(rng, shapes, lead=(3, 2))
    X = F.solve(U)
    assert [x.shape for x in X] == [(3, 2) + s for s in shapes]
    # the defining equation (λI + F) x = u, batched
    res = flat(F.matvec(X)) + 0.05 * flat(X) - flat(U)
    assert np.abs(res).max() < 1e-10 * np.abs(flat(U)).max()
    # per item equals unbatched; flat in, flat out
    X01 = F.solve([u[0, 1] for u in U])
    assert rel_err(flat([x[0, 1] for x in X]), flat(X01)) < 1e-13
    xf = F.solve(flat(U))
    assert xf.shape == (3, 2, F.n_params) and rel_err(xf, flat(X)) < 1e-13
    assert rel_err(F.matvec(flat(U)[1, 0]), Fd @ flat(U)[1, 0]) < F64_TOL
    # leading dimensions broadcast across layers
    Ub = [U[0][:, :1], U[1][0], U[2]]
    got = F.quad(Ub)
    ub = flat([np.broadcast_to(x, (3, 2) + s) for x, s in zip(Ub, shapes)])
    assert got.shape == (3, 2) and rel_err(got, np.einsum("abi,ij,abj->ab", ub, Fd, ub)) < F64_TOL


def test_aslinearoperator_matches_and_feeds_scipy_cg(xp):
    rng = np.random.default_rng(11)
    spec = NETS["mixed"]
    acts, errs = per_example_data(rng, spec, 5)
    Fd, _, _ = dense_F(acts, errs)
    lam = damping_for(Fd, 50.0)
    F = WoodburyFisher(list(on(xp, *acts)), list(on(xp, *errs)), lam)
    P = F.n_params
    u = rng.standard_normal(P)
    op = F.aslinearoperator()
    assert op.shape == (P, P)
    un, U2 = native(xp, u), native(xp, np.stack([u, 2 * u], 1))  # cupyx operators take CuPy arrays
    assert rel_err(op @ un, Fd @ u) < F64_TOL
    assert rel_err(op.matmat(U2), Fd @ np.stack([u, 2 * u], 1)) < F64_TOL
    inv = F.aslinearoperator(inverse=True)
    ref = np.linalg.solve(Fd + lam * np.eye(P), u)
    assert rel_err(inv @ un, ref) < F64_TOL
    # λI + F as a plain LinearOperator of the operator's library (cupyx's has no operator algebra)
    damped = linear_operator(xp, (P, P), lambda v: op @ v + lam * v, op.dtype)
    x, info = krylov(xp, "cg", damped, un, maxiter=10 * P)
    assert info == 0 and rel_err(x, ref) < 1e-8


# -- zero damping, scale, labels, independent batches -------------------------------------
def test_zero_damping_products_work_and_solves_explain():
    rng = np.random.default_rng(5)
    spec = NETS["mixed"]
    acts, errs = per_example_data(rng, spec, 4)
    Fd, G, s = dense_F(acts, errs)
    F = WoodburyFisher(acts, errs, 0.0)
    U, V = rand_U(rng, layer_shapes(spec)), rand_U(rng, layer_shapes(spec))
    assert rel_err(F.gram(), s * G.T @ G) < F64_TOL
    assert rel_err(flat(F.matvec(U)), Fd @ flat(U)) < F64_TOL
    assert rel_err(F.quad(U), flat(U) @ Fd @ flat(U)) < F64_TOL
    assert rel_err(F.bilinear(U, V), flat(U) @ Fd @ flat(V)) < F64_TOL
    P, M = F.n_params, F.n_columns
    msg = rf"needs damping > 0 but damping = 0: F has rank at most M = {M} .* < P = {P} parameters"
    with pytest.raises(np.linalg.LinAlgError, match=r"^solve\(\) " + msg):
        F.solve(U)
    with pytest.raises(np.linalg.LinAlgError, match=r"^logdet\(\) " + msg):
        F.logdet()
    with pytest.raises(np.linalg.LinAlgError, match=r"^sample\(\) " + msg):
        F.sample(np.random.default_rng(0), 2)
    with pytest.raises(np.linalg.LinAlgError, match=r"^aslinearoperator\(inverse=True\) needs damping"):
        F.aslinearoperator(inverse=True)
    # with_damping shares the Gram and solves
    F2 = F.with_damping(0.5)
    assert F2._K is F._K and F2.damping == 0.5 and F.damping == 0.0
    assert rel_err(flat(F2.solve(U)), np.linalg.solve(Fd + 0.5 * np.eye(P), flat(U))) < F64_TOL


def test_zero_damping_with_more_columns_than_parameters_points_to_dense():
    rng = np.random.default_rng(2)
    a, e = rng.standard_normal((9, 2)), rng.standard_normal((9, 2))
    F = WoodburyFisher([a], [e], 0)
    with pytest.raises(np.linalg.LinAlgError, match=r"P = 4 <= M = 9, factor the dense to_dense\(\)"):
        F.solve([np.ones((2, 2))])
    Fd, _, _ = dense_F([a], [e])
    assert rel_err(F.to_dense(), Fd) < F64_TOL
    assert rel_err(F.gram(), F.with_damping(1.0).gram()) == 0.0


def test_scale_default_is_one_over_inputs_and_explicit_scale():
    rng = np.random.default_rng(8)
    spec = NETS["mixed"]
    acts, errs = per_example_data(rng, spec, 6, 2)
    U = rand_U(rng, layer_shapes(spec))
    G = gradient_matrix(acts, errs)
    F = WoodburyFisher(acts, errs, 0.1)
    assert F.scale == pytest.approx(1 / 6)  # 1/N with N inputs, not 1/(N*S)
    assert rel_err(flat(F.matvec(U)), G @ (G.T @ flat(U)) / 6) < F64_TOL
    F2 = WoodburyFisher(acts, errs, 0.1, scale=0.25)
    assert rel_err(F2.gram(), 0.25 * G.T @ G) < F64_TOL
    assert rel_err(flat(F2.solve(U)), np.linalg.solve(0.25 * G @ G.T + 0.1 * np.eye(G.shape[0]), flat(U))) < F64_TOL


@pytest.mark.parametrize("kind", ["dense", "shared"])
def test_labels_per_input_are_more_columns(kind):
    """errs (N, S, ..., d_out) equals S explicit rows per input with the activations repeated."""
    rng = np.random.default_rng(4)
    N, S = 5, 3
    layer = ("dense", 6, 4) if kind == "dense" else ("shared", 7, 6, 4)
    acts, errs = per_example_data(rng, [layer], N, S)
    a, e = acts[0], errs[0]
    a_rep = np.repeat(a, S, axis=0)  # row i*S + s is input i
    e_rows = e.reshape((N * S,) + e.shape[2:])
    Fm = WoodburyFisher([a], [e], 0.2)
    Fr = WoodburyFisher([a_rep], [e_rows], 0.2, scale=1.0 / N)
    assert Fm.n_columns == Fr.n_columns == N * S
    assert rel_err(Fm.gram(), Fr.gram()) < 1e-13
    U = rand_U(rng, [(4, 6)])
    assert rel_err(flat(Fm.solve(U)), flat(Fr.solve(U))) < 1e-12
    # column c = i*S + s of the Gram is input i, label s
    g = per_example_grads(a, e)
    g12 = np.outer(e[1, 2], a[1]) if kind == "dense" else e[1, 2].T @ a[1]
    assert rel_err(g[1 * S + 2], g12) < 1e-14
    G = gradient_matrix([a], [e])
    assert rel_err(Fm.gram()[1 * S + 2, 0], G[:, 1 * S + 2] @ G[:, 0] / N) < 1e-13


def test_independent_batch_gradient_benzing_i5(xp):
    rng = np.random.default_rng(21)
    spec = NETS["mixed"]
    acts1, errs1 = per_example_data(rng, spec, 6)
    acts2, errs2 = per_example_data(rng, spec, 4)  # another batch, another size
    Fd, _, _ = dense_F(acts1, errs1)
    F = WoodburyFisher(list(on(xp, *acts1)), list(on(xp, *errs1)), 0.3)
    g2 = gradient_matrix(acts2, errs2).sum(axis=1) / 4  # the mean gradient of batch 2
    bg = WoodburyFisher.batch_gradient(list(on(xp, *acts2)), list(on(xp, *errs2)))
    assert [tuple(x.shape) for x in bg] == layer_shapes(spec) and rel_err(flat(bg), g2) < F64_TOL
    batch = (list(on(xp, *acts2)), list(on(xp, *errs2)))
    ref = np.linalg.solve(Fd + 0.3 * np.eye(Fd.shape[0]), g2)
    assert rel_err(flat(F.solve(batch=batch)), ref) < F64_TOL
    assert rel_err(flat(F.matvec(batch=batch)), Fd @ g2) < F64_TOL
    # the same-batch direction (biased, I.5) differs from the independent one
    g1 = gradient_matrix(acts1, errs1).sum(axis=1) / 6
    same = flat(F.solve(batch=(list(on(xp, *acts1)), list(on(xp, *errs1)))))
    assert rel_err(same, np.linalg.solve(Fd + 0.3 * np.eye(Fd.shape[0]), g1)) < F64_TOL
    bg3 = WoodburyFisher.batch_gradient(acts2, errs2, scale=1.0)
    assert rel_err(flat(bg3), 4 * g2) < F64_TOL


# -- sampling ------------------------------------------------------------------------------
def test_sample_covariance_matches_inverse_damped_fisher():
    rng = np.random.default_rng(31)
    spec = [("shared", 3, 3, 2), ("dense", 2, 3)]  # P = 12, M = 4
    acts, errs = per_example_data(rng, spec, 4)
    Fd, _, _ = dense_F(acts, errs)
    lam = 0.5
    F = WoodburyFisher(acts, errs, lam)
    n = 40000
    draws = F.sample(np.random.default_rng(123), n)
    assert [d.shape for d in draws] == [(n,) + s for s in layer_shapes(spec)]
    x = flat(draws)
    Sigma = np.linalg.inv(Fd + lam * np.eye(Fd.shape[0]))
    C = x.T @ x / n
    # Statistical tolerance: for zero-mean Gaussian draws the entry C_ij of the
    # sample covariance has standard error sqrt((S_ii S_jj + S_ij^2) / n).  With
    # P(P+1)/2 = 78 distinct entries a 5-standard-error bound fails with
    # probability < 1e-4 for a random seed; the seed is fixed, so the test is
    # deterministic.  The mean is checked against its standard error sqrt(S_ii / n).
    se = np.sqrt((np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma**2) / n)
    assert np.max(np.abs(C - Sigma) / se) < 5.0
    assert np.max(np.abs(x.mean(0)) / np.sqrt(np.diag(Sigma) / n)) < 5.0
    # the posterior is far from the prior λ⁻¹I in the directions F sees
    assert np.abs(Sigma - np.eye(len(Sigma)) / lam).max() > 50 * se.max()


def test_sample_reproducible_dtype_and_namespace(xp):
    rng = np.random.default_rng(9)
    acts, errs = per_example_data(rng, NETS["mixed"], 3)
    F = WoodburyFisher([on(xp, a, dtype="float32") for a in acts], [on(xp, e, dtype="float32") for e in errs], 0.1)
    d1 = F.sample(np.random.default_rng(5), 4)
    d2 = F.sample(np.random.default_rng(5), 4)
    assert all(type(a) is type(F.gram()) and a.dtype == F.dtype for a in d1)
    assert all(np.array_equal(to_np(a), to_np(b)) for a, b in zip(d1, d2))
    assert [tuple(a.shape) for a in F.sample(np.random.default_rng(0), 0)] == [(0,) + s for s in F.layer_shapes]


@pytest.mark.parametrize("dtype, lam", [("float64", 5e-324), ("float64", 1e-310), ("float32", 1e-39)])
def test_sample_refuses_a_damping_whose_inverse_overflows(dtype, lam):
    # the unseen directions have variance 1/λ: not representable, as in solve(), which refuses the same λ
    rng = np.random.default_rng(2)
    acts, errs = per_example_data(rng, NETS["mixed"], 3)
    F = WoodburyFisher([a.astype(dtype) for a in acts], [e.astype(dtype) for e in errs], lam)
    for call in (lambda: F.sample(np.random.default_rng(0), 2), lambda: F.solve(F.batch_gradient(acts, errs))):
        with pytest.raises(ValueError, match=r"1/damping .* overflows"):
            call()
    # the smallest damping whose inverse is representable still samples, finitely
    ok = F.with_damping(4.0 / float(np.finfo(dtype).max))
    assert all(np.all(np.isfinite(d)) for d in ok.sample(np.random.default_rng(0), 2))


# -- the weight-sharing Gram kernel -------------------------------------------------------
KERNEL_SHAPES = [  # (N, S, T, d_in, d_out): edges of the 8/16-lane panels and register blocks
    (1, 1, 1, 1, 1),
    (3, 1, 7, 5, 3),
    (4, 2, 16, 8, 8),
    (5, 3, 17, 9, 4),
    (2, 1, 33, 40, 1),
    (6, 1, 9, 1, 13),
    (3, 2, 5, 0, 3),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gram_kernel_matches_reference_and_grad(cpu_ext, shape, dtype):
    N, S, T, da, de = shape
    rng = np.random.default_rng(list(shape))
    A = rng.standard_normal((N, T, da)).astype(dtype)
    E = rng.standard_normal((N, S, T, de)).astype(dtype)
    g = per_example_grads(A.astype(np.float64), E.astype(np.float64)).reshape(N * S, -1)
    ref64 = g @ g.T
    tol = 1e-13 if dtype == "float64" else 1e-5
    for prepack in (-1, 0):  # shared packed copy, and per-thread repacking
        K = cpu_ext.woodbury_gram_shared(A, E.reshape(N * S, T, de), 1.0, prepack)
        assert K.dtype == A.dtype and K.shape == (N * S, N * S)
        assert np.array_equal(K, K.T)
        assert rel_err(K, ref64) < tol
    assert rel_err(cpu_ext.woodbury_gram_shared(A, E.reshape(N * S, T, de), 0.5), 0.5 * ref64) < tol
    assert rel_err(gram_shared_reference(np, A, E), ref64) < tol
    assert rel_err(gram_shared_reference(np, A, E, block_bytes=1), ref64) < tol  # one example per block
    assert rel_err(gram_shared_grad(np, A, E), ref64) < tol
    assert rel_err(gram_shared_grad(np, A, E, block_bytes=1), ref64) < tol  # one output feature per chunk
    assert rel_err(gram_shared(np, A, E, "kernel"), ref64) < tol
    with _ext.disabled():
        assert rel_err(gram_shared(np, A, E, "kernel"), ref64) < tol  # falls back to the reference


_ISA_CHECK = """
import numpy as np, kronlin._C as C
from kronlin._kernels.woodbury_gram import gram_shared_reference
rng = np.random.default_rng(0)
for (N, S, T, da, de) in [(3, 1, 7, 5, 3), (4, 2, 17, 9, 4), (2, 3, 33, 40, 1), (5, 1, 64, 16, 16)]:
    for dt, tol in (("float64", 1e-13), ("float32", 1e-5)):
        A = rng.standard_normal((N, T, da)).astype(dt)
        E = rng.standard_normal((N, S, T, de)).astype(dt)
        R = gram_shared_reference(np, A.astype(float), E.astype(float))
        for prepack in (-1, 0):
            K = C.woodbury_gram_shared(A, E.reshape(N * S, T, de), 1.0, prepack)
            assert np.abs(K - R).max() <= tol * np.abs(R).max(), (N, S, T, da, de, dt)
print(C.woodbury_gram_isa())
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_gram_kernel_narrower_simd_paths(cpu_ext, isa, tmp_path):
    """KRONLIN_WOODBURY_ISA selects the narrower code paths (each process picks its ISA once)."""
    best = cpu_ext.woodbury_gram_isa()
    if best == "baseline" and isa != "baseline":
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, KRONLIN_WOODBURY_ISA=isa)
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == isa


def test_gram_reference_on_array_api_strict(xp):
    rng = np.random.default_rng(1)
    A, E = rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 2, 6, 5))
    g = per_example_grads(A, E).reshape(6, -1)
    Ax, Ex = on(xp, A, E)
    for method in ("auto", "pairs", "kernel", "grad", "reference"):
        K = gram_shared(xp, Ax, Ex, method)
        assert type(K) is type(Ax) and rel_err(K, g @ g.T) < 1e-13
    Ad, Ed = on(xp, A[:, 0], E[:, :, 0])
    gd = per_example_grads(A[:, 0], E[:, :, 0]).reshape(6, -1)
    assert rel_err(gram_dense(xp, Ad, Ed), gd @ gd.T) < 1e-13


def test_gram_binding_rejects_bad_input(cpu_ext):
    A, E = np.ones((2, 3, 4)), np.ones((4, 3, 5))
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.woodbury_gram_shared(np.ones((2, 4, 3)).transpose(0, 2, 1), E, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_ext.woodbury_gram_shared(A.astype(np.float32), E, 1.0)
    with pytest.raises(ValueError, match="do not agree"):
        cpu_ext.woodbury_gram_shared(A, np.ones((3, 3, 5)), 1.0)
    with pytest.raises(ValueError, match=r"expected A \(N, T, da\)"):
        cpu_ext.woodbury_gram_shared(A[0], E, 1.0)
    assert cpu_ext.woodbury_gram_isa() in ("avx512", "avx2", "baseline")


@pytest.mark.parametrize("method", ["auto", "pairs", "kernel", "grad", "reference"])
def test_operator_same_with_every_gram_method_and_extension_disabled(method):
    rng = np.random.default_rng(17)
    acts, errs = per_example_data(rng, NETS["mixed"], 5, 2)
    U = rand_U(rng, layer_shapes(NETS["mixed"]))
    F = WoodburyFisher(acts, errs, 0.2, gram_method=method)
    with _ext.disabled():
        Fr = WoodburyFisher(acts, errs, 0.2, gram_method=method)
        Kr, Xr = Fr.gram(), Fr.solve(U)
    assert rel_err(F.gram(), Kr) < 1e-13
    assert rel_err(flat(F.solve(U)), flat(Xr)) < 1e-12


def test_cost_model_picks_cheaper_method():
    # measured (one core): (N, T, d_in, d_out) -> fastest method
    assert shared_costs(64, 1, 1024, 27, 16)["grad"] < shared_costs(64, 1, 1024, 27, 16)["pairs"]
    assert choose_method(np, 64, 1, 1024, 27, 16) == "grad"
    assert choose_method(np, 64, 1, 49, 576, 128) == "grad"  # grad 26 ms, kernel 199 ms
    assert choose_method(np, 16, 1, 64, 256, 256) == "grad"  # grad 5 ms, kernel 9.5 ms
    assert choose_method(np, 32, 1, 16, 512, 512) == "pairs"  # kernel 5.3 ms, grad 34 ms
    assert choose_method(np, 32, 1, 8, 1024, 1024) == "pairs"  # composition 3 ms, grad 135 ms
    assert use_kernel(np, 1, 16, 512, 512) == (_ext.cpu() is not None)
    assert not use_kernel(np, 1, 8, 1024, 1024)  # BLAS wins for very wide layers
    assert not use_kernel(np, 1, 4, 64, 64)  # mostly padding in the panels


def test_gram_cuda_kernel_matches_cpu():
    cupy = pytest.importorskip("cupy")
    try:
        ndev = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver
        ndev = 0
    if ndev == 0 or _ext.cuda() is None:
        pytest.skip("no CUDA device or kronlin._cuda")
    rng = np.random.default_rng(0)
    for (N, S, T, da, de) in [(3, 1, 7, 5, 3), (5, 2, 40, 17, 9), (2, 3, 65, 33, 70)]:
        A, E = rng.standard_normal((N, T, da)), rng.standard_normal((N, S, T, de))
        g = per_example_grads(A, E).reshape(N * S, -1)
        for dt, tol in (("float64", 1e-12), ("float32", 1e-5)):
            K = gram_shared(cupy, cupy.asarray(A.astype(dt)), cupy.asarray(E.astype(dt)), "pairs")
            Kn = cupy.asnumpy(K)
            assert np.array_equal(Kn, Kn.T) and rel_err(Kn, g @ g.T) < tol


# -- validation -------------------------------------------------------------------------------
A2, E2 = np.ones((4, 3)), np.ones((4, 2))
A3, E3 = np.ones((4, 5, 3)), np.ones((4, 5, 2))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: WoodburyFisher(A2, [E2], 0.1), TypeError, r"^acts must be a list with one array per layer"),
        (lambda: WoodburyFisher([A2], E2, 0.1), TypeError, r"^errs must be a list"),
        (lambda: WoodburyFisher([A2, A2], [E2], 0.1), ValueError,
         r"^acts and errs must hold one array per layer each.*got 2 and 1"),
        (lambda: WoodburyFisher([], [], 0.1), ValueError, r"^acts and errs must hold one array per layer"),
        (lambda: WoodburyFisher([A2, A3], [E2, np.ones((3, 5, 2))], 0.1), ValueError,
         r"^errs\[1\] has batch size 3 but acts\[0\] has 4: every layer needs the same N examples"),
        (lambda: WoodburyFisher([A2, np.ones((5, 5, 3))], [E2, E3], 0.1), ValueError,
         r"^acts\[1\] has batch size 5 but acts\[0\] has 4"),
        (lambda: WoodburyFisher([A3], [np.ones((4, 6, 2))], 0.1), ValueError,
         r"^errs\[0\] \(shape \(4, 6, 2\)\) has T = 6 positions but acts\[0\] \(shape \(4, 5, 3\)\) has T = 5"),
        (lambda: WoodburyFisher([A2, A2], [E2, np.ones((4, 2, 2))], 0.1), ValueError,
         r"^errs\[1\] has S = 2 labels per input but errs\[0\] has S = 1"),
        (lambda: WoodburyFisher([np.ones((4, 2, 2, 3))], [E2], 0.1), ValueError,
         r"^acts\[0\] must have shape \(N, d_in\) for a dense layer or \(N, T, d_in\)"),
        (lambda: WoodburyFisher([A2], [np.ones(4)], 0.1), ValueError,
         r"^errs\[0\] must have shape \(N, d_out\), or \(N, S, d_out\).*dense layer acts\[0\] of shape \(4, 3\)"),
        (lambda: WoodburyFisher([A3], [np.ones((4, 2))], 0.1), ValueError,
         r"^errs\[0\] must have shape \(N, T, d_out\), or \(N, S, T, d_out\)"),
        (lambda: WoodburyFisher([np.ones((0, 3))], [np.ones((0, 2))], 0.1), ValueError, r"^acts\[0\] has batch size 0"),
        (lambda: WoodburyFisher([A2, np.full((4, 3), np.nan)], [E2, E2], 0.1), ValueError,
         r"^acts\[1\] \(shape \(4, 3\)\) contains NaN or infinity"),
        (lambda: WoodburyFisher([A2], [np.full((4, 2), np.inf)], 0.1), ValueError,
         r"^errs\[0\] \(shape \(4, 2\)\) contains NaN or infinity"),
        (lambda: WoodburyFisher([A2], [E2], -1.0), ValueError, r"^damping must be finite and non-negative; got -1.0"),
        (lambda: WoodburyFisher([A2], [E2], np.nan), ValueError, r"^damping must be finite and non-negative"),
        (lambda: WoodburyFisher([A2], [E2], "x"), TypeError, r"^damping must be a real scalar"),
        (lambda: WoodburyFisher([A2], [E2], 0.1, scale=0.0), ValueError,
         r"^scale must be a finite positive number; got 0.0"),
        (lambda: WoodburyFisher([A2], [E2], 0.1, scale=np.inf), ValueError, r"^scale must be a finite positive number"),
        (lambda: WoodburyFisher([A2], [E2], 0.1, gram_method="fast"), ValueError, r"^gram_method must be one of"),
        (lambda: WoodburyFisher([A2], [np.ones((4, 2), dtype=complex)], 0.1), TypeError,
         r"^errs\[0\] has complex dtype"),
    ],
)
def test_constructor_errors_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_rhs_and_method_errors_name_the_argument():
    F = WoodburyFisher([A2, A3], [E2, E3], 0.1)  # layers (2, 3) and (2, 3): P = 12
    good = [np.ones((2, 3)), np.ones((2, 3))]
    with pytest.raises(ValueError, match=r"^U must hold one array per layer \(2 layers of shapes "
                                         r"\[\(2, 3\), \(2, 3\)\]\); got 1"):
        F.solve([np.ones((2, 3))])
    with pytest.raises(ValueError, match=r"^U\[1\] must have shape \(\.\.\., d_out, d_in\) = \(\.\.\., 2, 3\) "
                                         r"for layer 1; got shape \(3, 2\)"):
        F.matvec([np.ones((2, 3)), np.ones((3, 2))])
    with pytest.raises(ValueError, match=r"^U must be a list of per-layer arrays .* flat column-stacked array "
                                         r"\(\.\.\., P\) with P = 12; got shape \(11\)"):
        F.quad(np.ones(11))
    with pytest.raises(ValueError, match=r"^U\[0\] \(shape \(2, 3\)\) contains NaN or infinity"):
        F.solve([np.full((2, 3), np.nan), np.ones((2, 3))])
    with pytest.raises(ValueError, match=r"^V\[1\] must have shape"):
        F.bilinear(good, [np.ones((2, 3)), np.ones(3)])
    with pytest.raises(ValueError, match=r"leading \(batch\) dimensions of U\[0\] \(2, 2, 3\), "
                                         r"U\[1\] \(3, 2, 3\) do not broadcast"):
        F.matvec([np.ones((2, 2, 3)), np.ones((3, 2, 3))])
    with pytest.raises(TypeError, match=r"^U\[0\] is a array_api_strict array but the operator computes on numpy"):
        import array_api_strict as xs

        F.matvec([xs.ones((2, 3)), np.ones((2, 3))])
    with pytest.raises(TypeError, match=r"^solve\(\) takes exactly one of U and batch"):
        F.solve(good, batch=([A2, A3], [E2, E3]))
    with pytest.raises(TypeError, match=r"^matvec\(\) takes exactly one of U and batch"):
        F.matvec()
    with pytest.raises(TypeError, match=r"^batch must be a pair \(acts, errs\)"):
        F.solve(batch=[A2])
    with pytest.raises(ValueError, match=r"^batch acts\[1\]/batch errs\[1\] give layer 1 the weight shape "
                                         r"\(d_out, d_in\) = \(2, 4\) but the operator's layer 1 is \(2, 3\)"):
        F.solve(batch=([A2, np.ones((4, 5, 4))], [E2, E3]))
    with pytest.raises(ValueError, match=r"^batch acts must hold one array per layer of the operator \(2\); got 1"):
        F.solve(batch=([A2], [E2]))
    with pytest.raises(ValueError, match=r"^batch errs\[0\] \(shape \(4, 2\)\) contains NaN"):
        F.solve(batch=([A2, A3], [np.full((4, 2), np.nan), E3]))
    with pytest.raises(TypeError, match=r"^rng must be a numpy.random.Generator"):
        F.sample(np.random.RandomState(0), 2)
    with pytest.raises(ValueError, match=r"^size must be a non-negative integer; got -1"):
        F.sample(np.random.default_rng(0), -1)
    with pytest.raises(ValueError, match=r"^to_dense\(\) would build"):
        WoodburyFisher([np.ones((2, 3000))], [np.ones((2, 3000))], 0.1).to_dense()
    with pytest.raises(ValueError, match=r"^damping must be finite and non-negative"):
        F.with_damping(-2)


def test_tiny_damping_reports_singular_gram_with_damping_advice():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 4))
    acts, errs = [np.concatenate([a, a])], [np.ones((12, 2))]  # duplicate examples: K singular
    F = WoodburyFisher(acts, errs, 1e-300)
    with pytest.raises(np.linalg.LinAlgError,
                       match=r"damping·I \+ gram\(\) \(shape \(12, 12\)\) .*singular.*add damping"):
        F.solve([np.ones((2, 4))])


def test_repr_and_properties():
    F = WoodburyFisher([A2, A3], [E2, E3], 0.5)
    assert repr(F).startswith("WoodburyFisher(layers=[2x3, 2x3@T=5], N=4, S=1, damping=0.5")
    assert F.layer_shapes == [(2, 3), (2, 3)] and F.batch_size == 4 and F.labels == 1
    assert "WoodburyFisher" in kronlin.__all__


# -- memory ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_solve_memory_two_2000x2000_layers_far_below_dense_gradients():
    """8 million parameters, N = 64: the P × N gradient matrix would take 4.1 GB in float64.

    tracemalloc sees NumPy's allocations; the peak of one solve (after the
    operator, its Gram and the right-hand side exist) is the two result layers
    (2 x 30.5 MiB, updated in place) plus N x d-sized temporaries: 62 MiB measured.
    """
    rng = np.random.default_rng(0)
    N, d = 64, 2000
    acts = [rng.standard_normal((N, d)) for _ in range(2)]
    errs = [rng.standard_normal((N, d)) for _ in range(2)]
    F = WoodburyFisher(acts, errs, 1e-2)
    U = [rng.standard_normal((d, d)) for _ in range(2)]
    F.gram()
    tracemalloc.start()
    try:
        X = F.solve(U)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dense_bytes = F.n_params * N * 8
    print(f"\nWoodburyFisher.solve peak {peak / 2**20:.1f} MiB for P = {F.n_params}, N = {N} "
          f"(dense P x N gradients: {dense_bytes / 2**30:.2f} GiB)")
    assert peak < 128 * 2**20 and peak * 30 < dense_bytes
    # spot check: the residual of the first layer along a random probe
    r = flat(F.matvec(X)) + 1e-2 * flat(X) - flat(U)
    assert np.abs(r).max() < 1e-8 * np.abs(flat(U)).max()
