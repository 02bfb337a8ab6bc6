"""Worst error of each Stein method per dtype against cond(A⊗B + C⊗D)·eps·n on random problems (issue 17 item 4).

python bench/stein_accuracy.py  ->  bench/results/stein_accuracy.md
SPD pairs with condition numbers 1 to 1e4 per factor, sign=+1, orders 2-12; references by dense SciPy in float64.
"smith" gets contractive problems (C, D scaled to ρ(B⁻¹D)·ρ(A⁻¹C) ≈ 0.5); refusals are counted.
"""
import argparse

import numpy as np
import scipy.linalg as sl

import kronlin
from kronlin.testing import symmetric


def spd(rng, n, cond):
    """Eigenvalues log-spaced from 1 down to 1/cond in a random basis."""
    return symmetric(rng, np.geomspace(1.0, 1.0 / cond, n))


def main(trials=150, out="bench/results/stein_accuracy.md"):
    rng = np.random.default_rng(2017)
    rows = {}
    for _ in range(trials):
        p, q = (int(x) for x in rng.integers(2, 13, size=2))
        A, B, C, D = (spd(rng, n, 10 ** rng.uniform(0, 4)) for n in (p, q, p, q))
        V = rng.standard_normal((q, p))
        for method in ("auto", "eig", "schur", "smith"):
            Cm, Dm = C, D
            if method == "smith":
                r = max(abs(np.linalg.eigvals(np.linalg.solve(A, C)))) * max(abs(np.linalg.eigvals(np.linalg.solve(B, D))))
                Cm = C * (0.5 / r)
            K = np.kron(A, B) + np.kron(Cm, Dm)
            cond, ref = np.linalg.cond(K), sl.solve(K, V.flatten("F")).reshape(q, p, order="F")
            for dt in (np.float32, np.float64):
                args = [M.astype(dt) for M in (A, B, Cm, Dm, V)]
                key = (method, np.dtype(dt).name)
                row = rows.setdefault(key, {"n": 0, "refused": 0, "worst": 0.0, "worst_cond": 0.0})
                row["n"] += 1
                try:
                    U = kronlin.solve_kron_sum(*args, method=method).astype(np.float64)
                except np.linalg.LinAlgError:
                    row["refused"] += 1
                    continue
                err = np.linalg.norm(U - ref) / np.linalg.norm(ref)
                ratio = err / (cond * np.finfo(dt).eps * p * q)
                if ratio > row["worst"]:
                    row["worst"], row["worst_cond"], row["err"] = ratio, cond, err
    lines = ["# Stein accuracy: worst relative error / (cond(A⊗B + C⊗D)·eps·n), n = p·q", "",
             f"{trials} random SPD problems per method and dtype (seed 2017), factor conditions 1 to 1e4, orders 2-12.", "",
             "| method | dtype | problems | refused | worst err/(cond·eps·n) | its error | its cond |", "|---|---|---|---|---|---|---|"]
    for (m, d), r in sorted(rows.items()):
        lines.append(f"| {m} | {d} | {r['n']} | {r['refused']} | {r['worst']:.2g} | {r.get('err', 0):.2g} | {r['worst_cond']:.3g} |")
    text = "\n".join(lines) + "\n"
    open(out, "w").write(text)
    print(text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trials", nargs="?", type=int, default=150, help="random problems per method and dtype")
    ap.add_argument("--out", default="bench/results/stein_accuracy.md")
    a = ap.parse_args()
    main(a.trials, a.out)
