"""Benchmark of MuSc mutual scoring (one layer): against the official MuSc scorer and fp32 matmul.

Two tables (Markdown):

1. **Official comparison** (one process, runs alternated): cg3d's ``mutual_scores`` and the
   official ``MSM`` of xrli-U/MuSc (``models/modules/_MSM.py``: every pair computed in both
   directions with ``torch.cdist``) on identical tokens (default B = 32, N = 1369, C = 384: the
   issue's shape), with large fp32 matmuls (4096^3; torch's and, on CPU, numpy's BLAS) timed
   between them. Reported: best and median seconds of each, the speed-up (ratio of medians),
   cg3d's throughput as a share of the faster matmul's (``2 N^2 C`` flops per image pair,
   ``B (B - 1) / 2`` pairs), and the largest score difference (the check: <= 1e-5). ``--blas
   numpy,torch`` times cg3d with each CPU BLAS library (``cg3d_bids/core/scoring/blas.py``) in
   every round; by default only with the machine's default one. The official code is loaded at run time from a copy of
   their repository (``--musc-repo``: a clone or a bare git directory, e.g. the one the
   ``fetch`` tool makes); it is never copied into this repository. Without it the table says
   so and only cg3d is timed.
2. **Batch sizes** (a fresh subprocess per configuration, so that peak memory is its own):
   seconds per layer for each B at two block settings, CoDeGraph's total, the effective
   GFLOP/s next to the matmul measured in the same process, and peak memory (RSS on CPU,
   ``torch.cuda.max_memory_allocated`` on GPU) against the plan's prediction.

    python benchmarks/bench_scoring.py --musc-repo /work/.mirror/xrli-U+MuSc/repo
    python benchmarks/bench_scoring.py --musc-repo ~/src/MuSc --rounds 5 --sizes 15,30
    python benchmarks/bench_scoring.py --musc-repo ~/src/MuSc --no-sizes --blas numpy,torch
    python benchmarks/bench_scoring.py --device cuda --sizes 15,30,60,120 --no-official
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from unittest import mock
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _child import run_child  # noqa: E402  (benchmarks/, the script's folder)
MSM_PATH = "models/modules/_MSM.py"
MATMUL_SIZE = 4096


# ------------------------------------------------------------------------------------------------
# shared measurements
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def matmul_gflops(device: str, size: int = MATMUL_SIZE, repeats: int = 2) -> float:
    """Best of ``repeats`` fp32 ``size^3`` matmuls with torch (TF32 off), GFLOP/s."""
    from cg3d_bids.core.scoring.mutual import exact_fp32_matmul

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    with exact_fp32_matmul():
        torch.mm(a, b, out=out)
        best = min(_timed(lambda: torch.mm(a, b, out=out), device)[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def numpy_matmul_gflops(size: int = MATMUL_SIZE, repeats: int = 2) -> float:
    """Best of ``repeats`` fp32 ``size^3`` matmuls with numpy's BLAS (OpenBLAS in its wheels) on
    torch's thread count, GFLOP/s."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):
        np.matmul(a, b, out=out)
        best = min(_timed(lambda: np.matmul(a, b, out=out), "cpu")[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def tokens_for(n_images: int, n_tokens: int, dim: int, device: str, seed: int = 0):
    """Unit-norm Gaussian tokens (every token valid), as the official scorer expects."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_images, n_tokens, dim, generator=gen)
    tokens /= tokens.norm(dim=-1, keepdim=True)
    return tokens.to(device), torch.ones(n_images, n_tokens, dtype=torch.bool, device=device)


def pair_flops(n_images: int, n_tokens: int, dim: int) -> float:
    return n_images * (n_images - 1) / 2 * 2 * n_tokens**2 * dim


# ------------------------------------------------------------------------------------------------
# the official scorer, loaded from a copy of their repository
def load_official_msm(repo: str | None):
    """``(MSM function, description)`` from a clone or bare git dir of xrli-U/MuSc, or
    ``(None, reason)``."""
    if not repo:
        return None, "no --musc-repo given"
    path = Path(repo).expanduser()
    if (path / MSM_PATH).is_file():
        source, origin = (path / MSM_PATH).read_text(), f"{path / MSM_PATH}"
    else:
        git_dir = path / ".git" if (path / ".git").exists() else path
        result = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{MSM_PATH}"],
                                capture_output=True, text=True)
        if result.returncode:
            return None, f"{MSM_PATH} not found in {path} ({result.stderr.strip()})"
        commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        source, origin = result.stdout, f"{path} @ {commit[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="musc_msm_"))
    (folder / "_MSM.py").write_text(source)
    os.environ.setdefault("TQDM_DISABLE", "1")  # their loop shows a tqdm bar
    spec = importlib.util.spec_from_file_location("musc_official_msm", folder / "_MSM.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MSM, origin


def run_compare(args: argparse.Namespace) -> dict:
    """Alternate cg3d, the official MSM and the matmul in this process."""
    from cg3d_bids.core.scoring import musc_k, mutual_scores

    warnings.simplefilter("ignore")
    msm, origin = load_official_msm(args.musc_repo)
    b, n, c = args.compare_shape
    tokens, valid = tokens_for(b, n, c, args.device)
    if msm is not None and musc_k(b, 0.3) != int((b - 1) * 0.3):
        raise SystemExit(f"K differs from the official int((B - 1) * 0.3) at B = {b}")
    small, small_valid = tokens_for(6, 64, c, args.device, seed=1)  # warm-up, both scorers
    libraries = _libraries(args)
    for library in libraries:
        with _blas(library):
            mutual_scores(small, small_valid, device=args.device)
    if msm is not None:
        msm(small, args.device)
    cpu = not args.device.startswith("cuda")
    times: dict[str, list[float]] = {**{f"cg3d {lib}": [] for lib in libraries},
                                     "official": [], "matmul torch": [], "matmul numpy": []}
    ours, theirs = {}, None
    for _ in range(args.rounds):
        for library in libraries:
            with _blas(library):
                seconds, ours[library] = _timed(
                    lambda: mutual_scores(tokens, valid, device=args.device), args.device)
            times[f"cg3d {library}"].append(seconds)
        if msm is not None:
            with torch.no_grad():
                seconds, theirs = _timed(lambda: msm(tokens, args.device), args.device)
            times["official"].append(seconds)
        flop = 2 * MATMUL_SIZE**3 / 1e9
        times["matmul torch"].append(flop / matmul_gflops(args.device, repeats=1))
        if cpu:
            times["matmul numpy"].append(flop / numpy_matmul_gflops(repeats=1))
    diff = {}
    if theirs is not None:
        diff = {lib: float((out.double() - theirs.double().to(out.device)).abs().max())
                for lib, out in ours.items()}
    return {"times": times, "origin": origin, "max_abs_diff": diff, "shape": [b, n, c],
            "threads": torch.get_num_threads(), "libraries": libraries}


def _libraries(args: argparse.Namespace) -> list[str]:
    """The BLAS libraries cg3d is timed with: ``--blas``, else the machine's default."""
    from cg3d_bids.core.scoring.blas import BLAS_LIBRARIES, gemm_library

    if not args.blas:
        return [gemm_library(args.device)]
    chosen = [lib.strip() for lib in args.blas.split(",")]
    unknown = sorted(set(chosen) - set(BLAS_LIBRARIES))
    if unknown:
        raise SystemExit(f"--blas: unknown {unknown}; choose from {', '.join(BLAS_LIBRARIES)}")
    return chosen


def _blas(library: str):
    """``CG3D_CPU_BLAS=library`` inside the block (restored on exit)."""
    from cg3d_bids.core.scoring.blas import CPU_BLAS_ENV

    return mock.patch.dict(os.environ, {CPU_BLAS_ENV: library})


# ------------------------------------------------------------------------------------------------
# batch-size sweep (one configuration per child process)
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(field + ":"))


def _reset_peak(device: str) -> float:
    """Reset the peak (``VmHWM`` through ``/proc/self/clear_refs``; CUDA's peak stats) and
    return the memory held now, MB."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_mb("VmRSS")


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


def run_size(args: argparse.Namespace) -> dict:
    from cg3d_bids.core.scoring import codegraph_scores, mutual_scores
    from cg3d_bids.core.scoring.memory import predict_memory

    warnings.simplefilter("ignore")
    graph = args.child == "codegraph"
    fn = codegraph_scores if graph else mutual_scores
    kwargs = {"block_mb": args.block} if args.block else {}
    import igraph  # noqa: F401  (the graph step's library: process baseline, not working memory)

    fn(*tokens_for(6, 64, args.dim, args.device), device=args.device)  # warm-up
    tokens, valid = tokens_for(args.images, args.tokens, args.dim, args.device)
    held = _reset_peak(args.device)
    best = min(_timed(lambda: fn(tokens, valid, device=args.device, **kwargs), args.device)[0]
               for _ in range(args.repeats))
    peak = _peak_mb(args.device)
    plan = predict_memory("one-shot", args.images, args.tokens, args.dim, args.tokens,
                          codegraph=graph, block_mb=args.block or None, device=args.device)
    rates = [matmul_gflops(args.device)]
    if not args.device.startswith("cuda"):
        rates.append(numpy_matmul_gflops())
    return {"seconds": best, "work_mb": peak - held, "predicted_mb": plan.peak / 2**20,
            "matmul_gflops": max(rates)}  # the machine's faster large matmul


def _spawn(args: argparse.Namespace, child: str, **extra) -> dict:
    options = ["--device", args.device, "--tokens", str(args.tokens), "--dim", str(args.dim),
               "--repeats", str(args.repeats), "--rounds", str(args.rounds),
               "--compare-shape", ",".join(str(s) for s in args.compare_shape)]
    if args.musc_repo:
        options += ["--musc-repo", args.musc_repo]
    if args.threads:
        options += ["--threads", str(args.threads)]
    if args.blas:
        options += ["--blas", args.blas]
    return run_child(__file__, child, options, **extra)


# ------------------------------------------------------------------------------------------------
# tables
def print_compare(result: dict, device: str) -> None:
    b, n, c = result["shape"]
    times = result["times"]
    flops = pair_flops(b, n, c)
    matmuls = {lib: times[f"matmul {lib}"] for lib in ("torch", "numpy") if times[f"matmul {lib}"]}
    peaks = {lib: 2 * MATMUL_SIZE**3 / min(t) / 1e9 for lib, t in matmuls.items()}
    best_lib = max(peaks, key=peaks.get)
    peak = peaks[best_lib]  # the machine's fastest large matmul of this run

    def runs(values: list[float]) -> str:
        return ", ".join(f"{t:.2f}" for t in values)

    print(f"\n### cg3d vs official MuSc MSM: B = {b}, N = {n}, C = {c}, device {device}, "
          f"{result['threads']} threads, {len(times['official']) or len(matmuls['torch'])} "
          "alternated rounds\n")
    print("| scorer | best s | median s | all runs s | GFLOP/s (best) | share of fp32 matmul |")
    print("|---|---|---|---|---|---|")
    for lib in result["libraries"]:
        t = times[f"cg3d {lib}"]
        print(f"| cg3d `mutual_scores`, {lib}'s BLAS | {min(t):.2f} | {statistics.median(t):.2f}"
              f" | {runs(t)} | {flops / min(t) / 1e9:.0f} | {100 * flops / min(t) / 1e9 / peak:.0f} % |")
    if times["official"]:
        best, med = min(times["official"]), statistics.median(times["official"])
        print(f"| official `MSM` (both directions, cdist) | {best:.2f} | {med:.2f} | "
              f"{runs(times['official'])} | {flops / best / 1e9:.0f} "
              f"(pairs once) | {100 * flops / best / 1e9 / peak:.0f} % |")
    for lib, t in matmuls.items():
        print(f"| fp32 matmul {MATMUL_SIZE}^3, {lib} | {min(t):.3f} | {statistics.median(t):.3f} | | "
              f"{peaks[lib]:.0f} | {100 * peaks[lib] / peak:.0f} % |")
    print(f"\nshare = GFLOP/s (best run) / the fastest matmul's GFLOP/s ({best_lib}'s, best run); "
          "flops = 2 N^2 C per image pair, B (B - 1) / 2 pairs.")
    if times["official"]:
        for lib in result["libraries"]:
            ours = times[f"cg3d {lib}"]
            ratio = statistics.median(times["official"]) / statistics.median(ours)
            best_ratio = min(times["official"]) / min(ours)
            diff = result["max_abs_diff"][lib]
            verdict = "PASS" if diff <= 1e-5 else "FAIL"
            print(f"\ncg3d ({lib}'s BLAS): {ratio:.2f}x the official scorer (medians), "
                  f"{best_ratio:.2f}x (best runs). Largest |cg3d - official| score difference: "
                  f"{diff:.2e} ({verdict} at 1e-5).")
        print(f"\nOfficial code: {result['origin']}.")
    else:
        print(f"\nofficial MuSc scorer NOT AVAILABLE ({result['origin']}): pass --musc-repo "
              "PATH (a clone or bare git directory of https://github.com/xrli-U/MuSc); only "
              "cg3d was timed.")


def print_sizes(args: argparse.Namespace, rows: list) -> None:
    unit = "GPU MB" if args.device.startswith("cuda") else "RSS MB"
    blocks = args.block_mb
    print(f"\n### One layer by batch size: N = {args.tokens} valid tokens, C = {args.dim}, "
          f"device {args.device}\n")
    head = ["B"] + [f"MuSc s ({mb:g} MB)" for mb in blocks] + [
        "GFLOP/s", "fp32 matmul GFLOP/s", "share of matmul"]
    head += [f"work {unit} ({mb:g} MB)" for mb in blocks] + ["plan MB (first block)"]
    if not args.no_codegraph:
        head += ["CoDeGraph s", f"CoDeGraph work {unit}", "plan MB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for b, ours, graph in rows:
        fastest = min(ours, key=lambda o: o["seconds"])
        gflops = pair_flops(b, args.tokens, args.dim) / fastest["seconds"] / 1e9
        cells = [str(b)] + [f"{o['seconds']:.2f}" for o in ours] + [
            f"{gflops:.0f}", f"{fastest['matmul_gflops']:.0f}",
            f"{100 * gflops / fastest['matmul_gflops']:.0f} %"]
        cells += [f"{o['work_mb']:.0f}" for o in ours] + [f"{ours[0]['predicted_mb']:.0f}"]
        if graph is not None:
            cells += [f"{graph['seconds']:.2f}", f"{graph['work_mb']:.0f}",
                      f"{graph['predicted_mb']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nwork = peak (VmHWM reset once the input tokens exist) minus the memory held then; plan = "
          "`predict_memory` of the one-shot stage (cg3d_bids/core/scoring/memory.py). The "
          "fp32 matmul (4096^3, the faster of torch's and, on CPU, numpy's BLAS) runs in the same "
          "process right after the timed run.")


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--musc-repo", default=os.environ.get("MUSC_REPO"),
                        help="clone or bare git dir of xrli-U/MuSc (default: $MUSC_REPO)")
    parser.add_argument("--compare-shape", default="32,1369,384",
                        help="B,N,C of the official comparison")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (comparison)")
    parser.add_argument("--no-official", action="store_true", help="skip the comparison table")
    parser.add_argument("--sizes", default="15,30,60", help="batch sizes B, comma-separated")
    parser.add_argument("--tokens", type=int, default=2000, help="valid tokens per image N")
    parser.add_argument("--dim", type=int, default=384, help="token dimension C")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per size (best)")
    parser.add_argument("--block-mb", default="256,8",
                        help="two block memory settings (MB), comma-separated")
    parser.add_argument("--no-sizes", action="store_true", help="skip the batch-size table")
    parser.add_argument("--no-codegraph", action="store_true", help="skip the CoDeGraph column")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--blas", default="",
                        help="CPU BLAS libraries to time cg3d with, comma-separated: numpy, torch "
                        "(default: the machine's default, cg3d_bids/core/scoring/blas.py)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--block", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.compare_shape = [int(s) for s in args.compare_shape.split(",")]
    args.block_mb = [float(s) for s in args.block_mb.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = run_compare(args) if args.child == "compare" else run_size(args)
        print("RESULT " + json.dumps(result))
        return
    if not args.no_official:
        print_compare(_spawn(args, "compare"), args.device)
    if not args.no_sizes:
        rows = []
        for b in (int(s) for s in args.sizes.split(",")):
            ours = [_spawn(args, "ours", images=b, block=mb) for mb in args.block_mb]
            graph = None if args.no_codegraph else _spawn(args, "codegraph", images=b)
            rows.append((b, ours, graph))
            print(f"B={b} done", file=sys.stderr, flush=True)
        print_sizes(args, rows)


if __name__ == "__main__":
    main()
