"""Step traces of a training run, and their summary: where the wall time of a step goes.

The trainer records a `jax.profiler` trace of train.profile_steps steps (from train.profile_start
steps after the run's first step) into <run_dir>/profile/, with the host phases of every step named
by TraceAnnotations (`PHASES`). `summarize` reads the Perfetto JSON of such a trace and returns:

  host:   for each phase, its total and per-step milliseconds on the main Python thread;
  device: the wall span of the traced steps, the time at least one GPU kernel was running (busy), the
          busiest kernels by total time, and the time by kind of kernel (`KINDS`: attention, GCA, the
          SwiGLU gradient, the log-normaliser, matmuls, copies, other fusions), i.e. what the step
          spends its time on.

    python -m drt_jax.train.profiling runs/<name>/profile          # prints the summary as JSON
    python -m drt_jax.train.profiling runs/<name>/profile --hlo step.hlo.txt.gz   # and names each kernel's source

With the step's optimized HLO (`bench/train_throughput.py --hlo-dir`), `attribute` adds to each of the
busiest kernels the JAX operation it was fused from (the root's op_name), its result shape and the
bytes its operands and result occupy: the bytes a memory-bound fusion must move at least once.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys

import jax

# Host phases of a training step, as annotated in drt_jax.train.loop.
PHASES = ("next_batch", "to_device", "dispatch", "finite_check", "metrics", "stop_check", "checkpoint", "eval")


class StepProfiler:
    """Starts a trace before step `first` and stops it after `count` steps (0 steps: never)."""

    def __init__(self, directory: pathlib.Path, first: int, count: int):
        self.directory, self.first, self.last = directory, first, first + count
        self.active = False
        self.enabled = count > 0 and jax.process_index() == 0

    def before(self, step: int) -> None:
        if self.enabled and not self.active and step == self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Stops once `step` (the number of steps done) reaches the last traced step."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.enabled = False


def newest_trace(directory: str | pathlib.Path) -> pathlib.Path:
    traces = sorted(pathlib.Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}; record one with train.profile_steps=N")
    return traces[-1]


def _union_us(intervals) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


# Kernel kinds by name, first match wins: what a step's GPU kernels spend their time on, beside the busiest
# kernels one by one. XLA names its fused GEMMs gemm_fusion*, cuBLAS's Hopper kernels are nvjet_*.
KINDS = (
    ("attention", ("sdpa", "flash", "attention", "splash")),
    ("gca", ("gca",)),
    ("swiglu", ("swiglu",)),
    ("log-normaliser", ("logsumexp",)),
    ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "sm90_xmma", "dot")),
    ("copy", ("memcpy", "memset", "copy")),
    ("fusion", ("fusion", "reduce", "loop_", "input_", "triton")),
)


def kernel_kind(name: str) -> str:
    """The kind (KINDS) of a GPU kernel by its name, or "other"."""
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other"


def summarize(directory: str | pathlib.Path, top: int = 15, traced_steps: int | None = None) -> dict:
    """The summary of the newest trace under `directory` (see the module docstring). `traced_steps`:
    the number of steps the caller traced, for the per-step figures of a trace without step
    annotations (otherwise they are counted from the annotations)."""
    path = newest_trace(directory)
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            names[(e["name"], e["pid"], e.get("tid"))] = e["args"]["name"]
    gpu_pids = {pid for (kind, pid, _), n in names.items() if kind == "process_name" and "/device:GPU" in n}
    spans = [e for e in events if e.get("ph") == "X"]
    # The step annotations mark the main thread, whatever the profiler named it ("python", "MainThread").
    steps = [e for e in spans if e["name"].startswith("train") and e.get("pid") not in gpu_pids
             and "step_num" in e.get("args", {})]
    main = {e.get("tid") for e in steps} | {tid for (kind, _, tid), n in names.items() if kind == "thread_name" and n == "python"}
    phase_ms = collections.defaultdict(float)
    for e in spans:
        if e.get("tid") in main and e["name"] in PHASES:
            phase_ms[e["name"]] += e["dur"] / 1e3
    counted = len(steps) or traced_steps or 0
    n_steps = max(counted, 1)
    out = {"trace": str(path), "steps": counted}
    if steps:
        t0 = min(e["ts"] for e in steps)
        t1 = max(e["ts"] + e["dur"] for e in steps)
        out["wall_ms_per_step"] = (t1 - t0) / 1e3 / n_steps
    out["host_ms_per_step"] = {k: round(v / n_steps, 3) for k, v in sorted(phase_ms.items(), key=lambda kv: -kv[1])}
    kernels = [e for e in spans if e.get("pid") in gpu_pids and e.get("dur", 0) > 0]
    if kernels:
        # The device runs behind the host: its span starts with the first traced step and ends with
        # the last kernel, which may finish after the host's last step annotation.
        lo = min(e["ts"] for e in steps) if steps else min(e["ts"] for e in kernels)
        hi = max(e["ts"] + e["dur"] for e in kernels)
        inside = [(max(e["ts"], lo), min(e["ts"] + e["dur"], hi)) for e in kernels if e["ts"] < hi and e["ts"] + e["dur"] > lo]
        busy = _union_us(inside)
        by_name, by_kind, names_per_kind = collections.Counter(), collections.Counter(), collections.Counter()
        for e in kernels:
            by_name[e["name"]] += e["dur"]
        for name, dur in by_name.items():  # a kind per distinct name, not per launch
            kind = kernel_kind(name)
            by_kind[kind] += dur
            names_per_kind[kind] += 1
        total = sum(by_name.values())
        out["device"] = {
            "span_ms": (hi - lo) / 1e3, "busy_ms": busy / 1e3, "busy_fraction": busy / max(hi - lo, 1e-9),
            "span_ms_per_step": (hi - lo) / 1e3 / n_steps, "busy_ms_per_step": busy / 1e3 / n_steps,
            "top_kernels": [{"name": k[:120], "ms_per_step": v / 1e3 / n_steps, "share": v / total}
                            for k, v in by_name.most_common(top)],
            "by_kind": {k: {"ms_per_step": v / 1e3 / n_steps, "share": v / total, "kernels": names_per_kind[k]}
                        for k, v in by_kind.most_common()},
        }
    return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def _type_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO type (an array or a tuple of arrays)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _DTYPE_BYTES[dtype]
    return total


def hlo_kernels(hlo_text: str) -> dict:
    """The fusions and custom calls of an optimized HLO module, by the name their GPU kernel carries in a
    trace ("loop_add_fusion.3" runs as loop_add_fusion_3): {name: {op_name, shape, bytes, instances}}, where
    bytes is the size of one instance's operands plus its result, and instances counts the fusions XLA
    deduplicated into that one kernel (a trace sums their time under the name of one of them; an
    instance inside a loop body runs once per iteration, which the HLO does not count)."""
    types, calls = {}, []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, type_text, op, rest = m.groups()
        types[name] = type_text
        if op in ("fusion", "custom-call"):
            calls.append((name, type_text, rest))
    groups = collections.Counter()
    kernel_of = {}
    for name, _, rest in calls:
        dedup = re.search(r'deduplicated_name="([^"]*)"', rest)
        kernel_of[name] = dedup.group(1) if dedup else name
        groups[kernel_of[name]] += 1
    out = {}
    for name, type_text, rest in calls:
        args = rest.split(")", 1)[0]
        operand_bytes = sum(_type_bytes(types.get(a.strip().lstrip("%"), "")) for a in args.split(",") if a.strip())
        op_name = re.search(r'op_name="([^"]*)"', rest)
        out[name.replace(".", "_")] = {"op_name": op_name.group(1) if op_name else "", "shape": type_text,
                                       "bytes": operand_bytes + _type_bytes(type_text), "instances": groups[kernel_of[name]]}
    return out


def attribute(summary: dict, hlo_text: str) -> dict:
    """The summary with each top kernel's HLO source (see `hlo_kernels`) added, where the HLO has it."""
    table = hlo_kernels(hlo_text)
    for row in summary.get("device", {}).get("top_kernels", []):
        hit = table.get(row["name"])
        if hit:
            row.update(hit)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Summarize the newest step trace under a folder (train.profile_steps).")
    parser.add_argument("profile_dir", help="e.g. runs/<name>/profile")
    parser.add_argument("--top", type=int, default=15, help="how many of the busiest kernels to list")
    parser.add_argument("--hlo", help="the step's optimized HLO (text, or .gz): name each kernel's source operation")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.profile_dir, top=args.top)
        if args.hlo:
            opener = gzip.open if args.hlo.endswith(".gz") else open
            with opener(args.hlo, "rt") as f:
                summary = attribute(summary, f.read())
        print(json.dumps(summary, indent=2))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
