"""Cost curve of scoring one layer: time and peak memory by batch size, the memory plan's
prediction against the measured peak, and n shards against one process.

Three Markdown tables:

1. **Batch sizes** (B = 15..180 at fixed N): one-shot scoring of one layer (CoDeGraph on, or
   plain MuSc with ``--no-codegraph``), each B in a fresh subprocess: seconds, seconds per
   image, effective GFLOP/s (``2 N^2 C`` per image pair), measured peak memory (peak RSS
   increment over the process once its tokens exist; on CUDA ``torch.cuda.max_memory_allocated``)
   next to :func:`~cg3d_bids.core.scoring.memory.predict_memory`.
2. **Shards** (one B, n = 1 and each ``--shards`` value): every stage of every shard in its
   own subprocess (``score_rows`` per shard, ``build_graph``, ``rescore_rows`` per shard,
   exchanging ``.npz`` files as the app will): the sum of the stage times (total work), the
   critical path (slowest score shard + graph + slowest re-score shard: the wall time with
   one machine per shard), the largest measured/predicted peak per stage, and whether the
   final scores are byte-identical to the one-process run.

Choice of N: the work is ``B^2 N^2 C``; the default N = 512 valid tokens per image (C = 384)
keeps the largest batch (B = 180) at about half a minute and the whole benchmark at a few
minutes on 2 cores. The paper's shapes (16^3 = 4096 tokens, 1,000-2,500 valid) cost
``(N / 512)^2`` = 4-24x more per layer; memory terms scale as listed in
``cg3d_bids/core/scoring/memory.py`` (the minimum table grows as ``B^2 N``).

Tokens: unit-norm mixtures of 40 prototypes plus noise, with one pattern planted in 25 tokens of
20 % of the images (a consistent anomaly, so that CoDeGraph forms a community and re-scores).

    python benchmarks/bench_scale.py                            # B = 15..180, shards 2 and 4 at B = 60
    python benchmarks/bench_scale.py --sizes 15,30 --tokens 256 --shards 2,3 --shard-batch 30
    python benchmarks/bench_scale.py --device cuda --tokens 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _child import run_child  # noqa: E402  (benchmarks/, the script's folder)


# ------------------------------------------------------------------------------------------------
# data and measurements (children)
def make_tokens(n_images: int, n_tokens: int, dim: int, seed: int = 0):
    """Prototype mixture tokens (unit norm) with a consistent anomaly in 20 % of the images."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((40, dim))
    labels = rng.integers(40, size=(n_images, n_tokens))
    tokens = protos[labels] + 0.6 * rng.standard_normal((n_images, n_tokens, dim))
    pattern = protos[0] + 0.8 * rng.standard_normal(dim)
    for i in rng.permutation(n_images)[: max(2, n_images // 5)]:
        idx = rng.choice(n_tokens, 25, replace=False)
        tokens[i, idx] = pattern + 0.1 * rng.standard_normal((25, dim))
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    return tokens.astype(np.float32), np.ones((n_images, n_tokens), dtype=bool)


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


class PeakMemory:
    """Peak bytes above the level at construction: the RSS high-water mark ``VmHWM``, reset
    here through ``/proc/self/clear_refs`` (Linux >= 4.0), on CPU; on CUDA
    ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base


def _warm_up(args) -> None:
    """First calls and imports (python-igraph included) before measuring."""
    import igraph  # noqa: F401  (imported by the graph step; part of the process baseline)

    from cg3d_bids.core.scoring import codegraph_scores

    codegraph_scores(*make_tokens(6, 40, args.dim, seed=1), device=args.device)


def child_oneshot(args) -> dict:
    from cg3d_bids.core.scoring import codegraph_scores, mutual_scores
    from cg3d_bids.core.scoring.memory import predict_memory

    tokens, valid = make_tokens(args.images, args.tokens, args.dim)
    _warm_up(args)
    fn = mutual_scores if args.no_codegraph else codegraph_scores
    meter = PeakMemory(args.device)
    t0 = time.perf_counter()
    scores = fn(tokens, valid, device=args.device)
    seconds = time.perf_counter() - t0
    peak = meter.peak()
    if args.out:
        np.save(args.out, np.asarray(scores))
    est = predict_memory("one-shot", args.images, args.tokens, args.dim, args.tokens,
                         codegraph=not args.no_codegraph, device=args.device)
    return {"seconds": seconds, "peak": peak, "predicted": est.peak}


def child_stage(args) -> dict:
    """One stage of one shard; reads and writes the stages' ``.npz`` files in ``args.work``."""
    from cg3d_bids.core.scoring import (CodeGraphSettings, GraphResult, RowScores, build_graph,
                                        rescore_rows, score_rows)
    from cg3d_bids.core.scoring.memory import predict_memory

    work, settings = Path(args.work), CodeGraphSettings()
    tokens, valid = make_tokens(args.images, args.tokens, args.dim)
    query = [int(q) for q in args.query.split(",")] if args.query else None
    rows = graph = None
    if args.child == "graph":
        rows = [RowScores.from_arrays(np.load(p)) for p in sorted(work.glob("rows_*.npz"))]
    elif args.child == "rescore":
        rows = RowScores.from_arrays(np.load(work / f"rows_{args.shard}.npz"))
        graph = GraphResult.from_arrays(np.load(work / "graph.npz"))
    _warm_up(args)
    meter = PeakMemory(args.device)
    t0 = time.perf_counter()
    if args.child == "score":
        result = score_rows(tokens, valid, query, 0.3, codegraph=settings, device=args.device)
        name, stage, n_query = f"rows_{args.shard}.npz", "score", len(query)
    elif args.child == "graph":
        result = build_graph(rows, args.images, settings)
        name, stage, n_query = "graph.npz", "graph", args.images
    else:
        result = rescore_rows(tokens, valid, query, 0.3, rows, graph, device=args.device)
        name, stage, n_query = f"final_{args.shard}.npz", "rescore", len(query)
    seconds = time.perf_counter() - t0
    peak = meter.peak()
    np.savez(work / name, **result.to_arrays())
    est = predict_memory(stage, args.images, args.tokens, args.dim, args.tokens,
                         n_query=n_query, device=args.device)
    return {"seconds": seconds, "peak": peak, "predicted": est.peak}


# ------------------------------------------------------------------------------------------------
# driver
def _spawn(args, child: str, codegraph: bool = True, **extra) -> dict:
    options = ["--device", args.device, "--tokens", str(args.tokens), "--dim", str(args.dim)]
    if args.threads:
        options += ["--threads", str(args.threads)]
    if not codegraph:
        options.append("--no-codegraph")
    return run_child(__file__, child, options, **extra)


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f}"


def table_sizes(args) -> None:
    rows = []
    for b in args.sizes:
        rows.append((b, _spawn(args, "oneshot", codegraph=not args.no_codegraph, images=b)))
        print(f"B={b} done", file=sys.stderr, flush=True)
    kind = "MuSc" if args.no_codegraph else "CoDeGraph (MuSc + consistent-anomaly stage)"
    unit = "GPU" if args.device.startswith("cuda") else "RSS"
    print(f"\n### One layer by batch size: {kind}, N = {args.tokens} valid tokens, C = {args.dim}, "
          f"device {args.device}, {args.threads or torch.get_num_threads()} threads\n")
    print(f"| B | seconds | s per image | GFLOP/s | peak {unit} MB | predicted MB | "
          "measured / predicted |")
    print("|---|---|---|---|---|---|---|")
    for b, r in rows:
        flops = b * (b - 1) / 2 * 2 * args.tokens**2 * args.dim
        print(f"| {b} | {r['seconds']:.2f} | {r['seconds'] / b:.3f} | "
              f"{flops / r['seconds'] / 1e9:.0f} | {_mb(r['peak'])} | {_mb(r['predicted'])} | "
              f"{r['peak'] / r['predicted']:.2f} |")


def run_sharded(args, n_shards: int, work: Path) -> dict:
    b = args.shard_batch
    parts = [p.tolist() for p in np.array_split(np.arange(b), n_shards)]  # consecutive images
    score = [_spawn(args, "score", images=b, work=work, shard=k, query=",".join(map(str, p)))
             for k, p in enumerate(parts)]
    graph = _spawn(args, "graph", images=b, work=work)
    rescore = [_spawn(args, "rescore", images=b, work=work, shard=k,
                      query=",".join(map(str, p))) for k, p in enumerate(parts)]
    final = np.zeros((b, args.tokens), dtype=np.float32)
    for k, p in enumerate(parts):
        with np.load(work / f"final_{k}.npz") as data:
            final[p] = data["scores"]
    return {"score": score, "graph": graph, "rescore": rescore, "final": final}


def table_shards(args) -> None:
    b = args.shard_batch
    with tempfile.TemporaryDirectory() as tmp:
        one = _spawn(args, "oneshot", images=b, out=Path(tmp) / "oneshot.npy")
        reference = np.load(Path(tmp) / "oneshot.npy")
        results = []
        for n in args.shards:
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            results.append((n, run_sharded(args, n, work)))
            print(f"shards={n} done", file=sys.stderr, flush=True)
    print(f"\n### Shards vs one process: B = {b}, N = {args.tokens}, C = {args.dim}, "
          f"device {args.device} (each stage of each shard in its own process)\n")
    print("| shards | score s (slowest / sum) | graph s | re-score s (slowest / sum) | "
          "total work s | critical path s | peak MB score / graph / re-score (predicted) | "
          "identical to one process |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 process | | | | {one['seconds']:.2f} | {one['seconds']:.2f} | "
          f"{_mb(one['peak'])} ({_mb(one['predicted'])}) | reference |")
    for n, r in results:
        s = [x["seconds"] for x in r["score"]]
        q = [x["seconds"] for x in r["rescore"]]
        g = r["graph"]["seconds"]
        peaks = [max(r["score"], key=lambda x: x["peak"]), r["graph"],
                 max(r["rescore"], key=lambda x: x["peak"])]
        mem = " / ".join(f"{_mb(x['peak'])} ({_mb(x['predicted'])})" for x in peaks)
        same = np.array_equal(r["final"], reference)
        print(f"| {n} | {max(s):.2f} / {sum(s):.2f} | {g:.2f} | {max(q):.2f} / {sum(q):.2f} | "
              f"{sum(s) + g + sum(q):.2f} | {max(s) + g + max(q):.2f} | {mem} | "
              f"{'yes' if same else 'NO'} |")
    print("\ntotal work = all stages of all shards one after another; critical path = slowest "
          "score shard + graph + slowest re-score shard (one machine per shard). A pair of "
          "images in two different shards is computed by both (each pair once within a shard), "
          "so the score stage's total work grows towards 2x; re-scoring recomputes the rows "
          "of community members only. Shards are runs of consecutive images: a tile multiplies "
          "a group of consecutive reference images, so scattered query images would make "
          "nearly every tile touch every shard.")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="15,30,60,90,120,180", help="batch sizes B")
    parser.add_argument("--tokens", type=int, default=512, help="valid tokens per image N")
    parser.add_argument("--dim", type=int, default=384, help="token dimension C")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shards", default="2,4", help="shard counts to compare with 1 process")
    parser.add_argument("--shard-batch", type=int, default=60, help="B of the shard table")
    parser.add_argument("--no-codegraph", action="store_true",
                        help="plain MuSc in the batch-size table (shards always use CoDeGraph)")
    parser.add_argument("--no-sizes", action="store_true")
    parser.add_argument("--no-shards", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    for hidden in ("child", "work", "query", "out"):
        parser.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.shards = [int(s) for s in args.shards.split(",")]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        fn = child_oneshot if args.child == "oneshot" else child_stage
        print("RESULT " + json.dumps(fn(args)))
        return
    if not args.no_sizes:
        table_sizes(args)
    if not args.no_shards:
        table_shards(args)


if __name__ == "__main__":
    main()
