"""kronlin.torch's KFAC step on the CPU under each thread setting (torch's pool, the BLAS pools).

kronlin's statistics, inverses and products run in NumPy/SciPy's OpenBLAS, beside torch's own OpenMP pool.
Each setting runs in its own process (thread counts are fixed at start-up): KFAC (factored damping, refresh
every 10, steady state) and plain SGD train the same MLP on the same batches, alternating blocks of 10 steps;
ms per step are medians over the rounds, the ratio the median of the per-round ratios.

    python bench/torch_threads.py          # -> bench/results/torch_threads.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before threadpool_limits, so the limit covers it)

HERE = Path(__file__).resolve().parent
SETTINGS = {  # name: (torch threads or None for torch's default, BLAS threads or None for the libraries')
    "defaults (torch and BLAS as they start)": (None, None),
    "BLAS pinned to 1 (threadpool_limits(1, 'blas'))": (None, 1),
    "torch pinned to 1 (torch.set_num_threads(1))": (1, None),
    "both pinned to 1": (1, 1),
}
MODELS = (((784, 512, 512, 10), 256, 5), ((2048, 2048, 2048, 10), 1024, 3))


def child(torch_threads, blas_threads, sizes, N, rounds) -> dict:
    import copy
    import statistics

    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from _harness import torch_mlp_task, torch_trainer
    import kronlin.torch as kt

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    base, batches = torch_mlp_task(sizes, N)
    model = copy.deepcopy(base)
    kfac = torch_trainer(model, kt.KFAC(model, damping=1e-2, damping_mode="factored", refresh_period=10), batches)
    sgd = torch_trainer(base, None, batches)

    def measure():
        kfac(30)  # past the first refreshes
        sgd(10)
        k, s = [], []
        for _ in range(rounds):
            k.append(kfac(10))
            s.append(sgd(10))
        blas = sorted({(i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"})
        return {"kfac_ms": 1e3 * statistics.median(k), "sgd_ms": 1e3 * statistics.median(s),
                "ratio": statistics.median(a / b for a, b in zip(k, s)), "torch_threads": torch.get_num_threads(),
                "blas": blas}  # fmt: skip

    if blas_threads is None:
        return measure()
    with threadpool_limits(blas_threads, user_api="blas"):
        return measure()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}  # the libraries' own defaults
    rows = []
    for sizes, N, rounds in MODELS:
        for name, (tt, bt) in SETTINGS.items():
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([tt, bt, sizes, N, rounds])],
                                 capture_output=True, text=True, env=env, cwd=HERE, check=True)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((sizes, N, name, r))
            print(sizes, N, name, r, flush=True)
    lines = ["# kronlin.torch KFAC on the CPU under each thread setting", "",
             f"`python bench/torch_threads.py`; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the "
             "end. KFAC: factored damping, refresh every 10, steady state; blocks of 10 steps of KFAC and of SGD "
             "alternate; medians over the rounds.", "",
             "| MLP, batch | threads | torch pool | BLAS pools | KFAC ms/step | SGD ms/step | KFAC / SGD |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for sizes, N, name, r in rows:
        blas = ", ".join(f"{api} {n}" for api, n in r["blas"])
        lines.append(f"| {'-'.join(map(str, sizes))}, {N} | {name} | {r['torch_threads']} | {blas} | "
                     f"{r['kfac_ms']:.1f} | {r['sgd_ms']:.1f} | {r['ratio']:.2f}× |")
    (HERE / "results" / "torch_threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
