"""T3 decode-step benchmark (a script, not a timed test): what one step costs against what the machine allows.

    python jobs/benchmark_t3.py --bundle B [--rows 2 32 64] [--past 200] [--threads 2] [--json out.json]

Times one decode step (one new position per CFG row, `past` cached positions each) three ways, in one run:

- `copy`: the t3_lm contract graph, the whole cache passed in and returned as new numpy arrays each step
  (how the runtime worked before the in-place cache);
- `in_place`: t3_lm_step through the runtime's preallocated `KVCache` (views in, new positions written in place);
- `in_place_int8`: the same with the bundle's int8 step graph, when it has one.

And the limit for each: measured on this machine, in this run, the memory bandwidth (numpy copy) and the matmul
throughput of the step's own weight shapes (ONNX Runtime, fp32 and dynamic int8); a step can be no faster than
max(bytes it must read / bandwidth, its FLOPs / matmul throughput).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from actors.backends import Backend, OrtSession, Session
from actors.bundle import load_bundle
from actors.chatterbox.decode import KVCache, T3Graphs
from actors.chatterbox.t3 import T3


def seconds(fn: Callable[[], object], repeats: int, best: bool = False) -> float:
    """Median wall seconds of `fn` after a warm-up call; `best`: the fastest (a machine limit, not a typical cost)."""
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def memory_bandwidth_gbs(mb: int = 512) -> float:
    """Bytes moved per second by a large numpy copy (read + write), GB/s."""
    a = np.ones(mb << 18, np.float32)
    b = np.empty_like(a)
    return 2 * a.nbytes / seconds(lambda: np.copyto(b, a), 5, best=True) / 1e9


def matmul_gflops(rows: int, k: int, n: int, threads: int, int8: bool) -> float:
    """ONNX Runtime throughput of [rows, k] @ [k, n] with constant weights, fp32 or dynamically quantized int8."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * k ** -0.5
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])
    if int8:
        scale = np.abs(w).max(axis=0) / 127
        q = np.round(w / scale).astype(np.int8)
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "xs", "ws", "xz"], ["y"],
                                  domain="com.microsoft")]
        inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws")]
    else:
        nodes, inits = [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")]
    model = helper.make_model(helper.make_graph(nodes, "mm", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "matmul.onnx")
        sess = OrtSession(Path(tmp) / "matmul.onnx", Backend(threads=threads))
    feed = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
    return 2 * rows * k * n / seconds(lambda: sess.run(feed), 30, best=True) / 1e9


def lm_weights(path: Path) -> tuple[int, int]:
    """(weight bytes, multiply-accumulates per row and position) of an LM graph's matmul weights."""
    graph = onnx.load(str(path), load_external_data=False).graph
    nbytes = macs = 0
    for init in graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        nbytes += n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        if len(init.dims) == 2 and min(init.dims) >= 64:
            macs += n
    return nbytes, macs


class StepRunner:
    """One decode step over `rows` CFG rows with `past` cached positions each, on one LM graph."""

    def __init__(self, stage: T3, lm: Session, rows: int, past: int, in_place: bool) -> None:
        t3, rng = stage.t3, np.random.default_rng(0)
        self.graphs = T3Graphs(lm, stage.sessions["t3_speech_embed"], t3["num_layers"], t3["num_kv_heads"],
                               t3["head_dim"])
        self.embeds = rng.standard_normal((rows, 1, t3["hidden_size"])).astype(np.float32) * 0.3
        self.in_place, self.rows, self.length = in_place, rows, past
        tensors = len(self.graphs.past)

        def random_kv(n: int) -> list[np.ndarray]:
            return [rng.standard_normal((n, t3["num_kv_heads"], past, t3["head_dim"]), np.float32) * 0.5
                    for _ in range(tensors)]
        if in_place:
            self.cache = KVCache(tensors, rows, t3["num_kv_heads"], t3["head_dim"])
            for _ in range(rows // 2):  # two rows at a time: no second full-size copy of the cache in memory
                self.cache.add(random_kv(2), np.ones((2, past), np.int64))
        else:
            self.past = random_kv(rows)

    def __call__(self) -> None:
        if self.in_place:
            c = self.cache
            _, new = self.graphs.run(self.embeds, c.step_mask(), c.positions(), c.views())
            c.append(new)
            c.length[:self.rows] -= 1   # stay at `past` cached positions: forget the column just written
            c.mask[np.arange(self.rows), c.length[:self.rows]] = 0
            return
        mask = np.ones((self.rows, self.length + 1), np.int64)
        positions = np.full((self.rows, 1), self.length, np.int64)
        feeds = {"inputs_embeds": self.embeds, "attention_mask": mask, "position_ids": positions,
                 **dict(zip(self.graphs.past, self.past))}
        self.graphs.lm.run(feeds)   # the whole cache comes back: P + 1 positions per row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark_t3", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a Chatterbox bundle (full size for meaningful figures)")
    p.add_argument("--rows", type=int, nargs="+", default=[2, 32, 64], help="CFG rows per step")
    p.add_argument("--past", type=int, default=200, help="cached positions per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="where to write the results")
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    backend = Backend(threads=args.threads)
    stage = T3(bundle, backend=backend)
    t3 = stage.t3
    hidden, inter = t3["hidden_size"], int(bundle.manifest["model"]["config"]["t3"]["intermediate_size"])
    ways = {"copy": ("t3_lm", False), "in_place": ("t3_lm_step", True)}
    if "t3_lm_step_int8" in bundle.manifest["graphs"]:
        ways["in_place_int8"] = ("t3_lm_step_int8", True)
    sessions = {graph: stage.sessions.get(graph) or bundle.open(graph, backend) for graph, _ in ways.values()}
    bandwidth = memory_bandwidth_gbs()
    kv_bytes_per_position = 2 * t3["num_layers"] * t3["num_kv_heads"] * t3["head_dim"] * 4
    report: dict = {"bundle": str(args.bundle), "threads": args.threads, "past": args.past,
                    "memory_bandwidth_gbs": round(bandwidth, 1), "steps": {}}
    for rows in args.rows:
        # the step's dominant matmul shape (the MLP's up projection) at this many rows
        throughput = {"fp32": matmul_gflops(rows, hidden, inter, args.threads, int8=False),
                      "int8": matmul_gflops(rows, hidden, inter, args.threads, int8=True)}
        entry: dict = {"matmul_gflops": {k: round(v, 1) for k, v in throughput.items()}}
        for way, (graph, in_place) in ways.items():
            weight_bytes, macs = lm_weights(bundle.graph(graph))
            runner = StepRunner(stage, sessions[graph], rows, args.past, in_place)
            took = seconds(runner, args.repeats)
            read = weight_bytes + rows * args.past * kv_bytes_per_position
            attention = 4 * rows * args.past * t3["num_layers"] * t3["num_kv_heads"] * t3["head_dim"]
            limit = max(read / (bandwidth * 1e9),
                        2 * rows * macs / (throughput["int8" if "int8" in graph else "fp32"] * 1e9)
                        + attention / (throughput["fp32"] * 1e9))
            entry[way] = {"ms": round(took * 1e3, 1), "limit_ms": round(limit * 1e3, 1),
                          "of_limit": round(took / limit, 2)}
            del runner
        report["steps"][rows] = entry
        print(json.dumps({rows: entry}), flush=True)
    base = report["steps"]
    lines = ["| CFG rows | " + " | ".join(f"{w} ms (× limit)" for w in ways) + " |",
             "|---" * (len(ways) + 1) + "|"]
    for rows, entry in base.items():
        lines.append(f"| {rows} | " + " | ".join(f"{entry[w]['ms']} ({entry[w]['of_limit']}×)" for w in ways) + " |")
    if 32 in base and 64 in base:
        report["64_vs_32"] = {w: round(base[64][w]["ms"] / base[32][w]["ms"], 2) for w in ways}
        lines.append(f"\n64 rows / 32 rows: {report['64_vs_32']}")
    lines.append(f"memory bandwidth {bandwidth:.1f} GB/s (numpy copy); matmul GFLOP/s at "
                 f"[rows, {hidden}] @ [{hidden}, {inter}]: "
                 + ", ".join(f"{r} rows {e['matmul_gflops']}" for r, e in base.items()))
    report["table"] = "\n".join(lines)
    print(report["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
