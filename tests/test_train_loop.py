"""The loop's parts: batches prefetched ahead with their data positions, metrics read one step behind
with the non-finite guard, and the step trace with its summary."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from drt_jax.train.logger import StepLogger
from drt_jax.train.prefetch import DevicePrefetcher
from tests.train_fixtures import enable_compilation_cache, small_run, write_corpus


class _Counting:
    """A host iterator of numbered batches whose state is the number of batches read."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.i, self.n, self.fail_at = 0, n, fail_at

    def __next__(self):
        if self.i == self.fail_at:
            raise KeyError("broken shard")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"tokens": np.full((2, 3), self.i)}

    def get_state(self):
        return {"read": self.i}


def test_prefetcher_keeps_order_and_the_position_after_each_batch():
    host = _Counting(6)
    batches = DevicePrefetcher(host, lambda b: b, lambda f: {k: v + 100 for k, v in f.items()}, depth=2, keep_local=True)
    seen = list(batches)
    batches.close()
    assert [int(local["tokens"][0, 0]) for local, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [int(dev["tokens"][0, 0]) for _, dev, _ in seen] == [101, 102, 103, 104, 105, 106]
    # A checkpoint after the k-th step must record k batches read, however far the thread ran ahead.
    assert [pos.get_state() for _, _, pos in seen] == [f'{{\n    "read": {k}\n}}'.encode() for k in range(1, 7)]


def test_prefetcher_raises_the_readers_error_in_the_loop():
    batches = DevicePrefetcher(_Counting(10, fail_at=3), lambda b: b, lambda f: f)
    assert [int(dev["tokens"][0, 0]) for _, dev, _ in (next(batches) for _ in range(3))] == [1, 2, 3]
    with pytest.raises(KeyError, match="broken shard"):
        next(batches)
    batches.close()


def _metrics(loss, diag=1.0):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0), "param_norm": jnp.float32(2.0),
            "tokens": jnp.float32(8.0), "lr": jnp.float32(1e-3),
            "diagnostics": {"answer_loss_sum": jnp.float32(diag), "answer_tokens": jnp.float32(2.0)}}


def test_logger_writes_each_logging_step_one_step_later_with_interval_diagnostics():
    rows = []
    logger = StepLogger(tokens_per_step=8, flops_per_step=1.0, peak_flops=None, on_row=lambda s, r: rows.append((s, r)))
    for step in range(1, 7):
        logger.push(step, _metrics(float(step), diag=float(step)), log=step in (1, 4))
        # A logging step's row appears at the next push, once the device has moved on.
        assert [s for s, _ in rows] == ([] if step < 2 else [1] if step < 5 else [1, 4])
    logger.check()
    (s1, r1), (s4, r4) = rows
    assert r1["loss"] == 1.0 and r4["loss"] == 4.0
    assert r1["answer_loss"] == 1.0 / 2.0
    assert r4["answer_loss"] == (2.0 + 3.0 + 4.0) / (3 * 2.0)  # summed over steps 2-4 only
    assert logger.first_loss == 1.0 and logger.last_loss == 4.0


def test_logger_names_the_first_non_finite_step_before_any_save():
    logger = StepLogger(tokens_per_step=8, flops_per_step=1.0, peak_flops=None, on_row=lambda s, r: None)
    logger.last_saved = 2
    for step, loss in ((1, 1.0), (2, 1.0), (3, float("nan")), (4, float("inf")), (5, 1.0)):
        logger.push(step, _metrics(loss), log=False)  # no logging step: only check() can see it
    with pytest.raises(FloatingPointError, match="at step 3 .*the newest checkpoint is step 2") as err:
        logger.check()
    assert "\n" not in str(err.value)


def test_a_run_records_and_summarizes_a_step_trace(tmp_path):
    from drt_jax.train.loop import train
    from drt_jax.train.profiling import summarize

    enable_compilation_cache()
    corpus = write_corpus(tmp_path / "corpus")
    run = small_run(tmp_path, corpus, steps=6, eval_every=0, profile_start=2, profile_steps=3)
    train(run, print_fn=lambda *a: None)
    summary = summarize(run.run_dir / "profile")
    assert summary["steps"] == 3
    assert {"next_batch", "dispatch", "metrics"} <= set(summary["host_ms_per_step"])


def test_trace_summary_splits_device_time_by_kind_of_kernel(tmp_path):
    import gzip
    import json

    from drt_jax.train.profiling import summarize

    meta = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
    kernels = [("gemm_fusion_dot_general_124", 0, 300), ("nvjet_sm90_tst_128x128", 300, 100),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 400, 200), ("gca_fwd_pallas_gpu", 600, 50),
               ("loop_multiply_fusion_43", 650, 40), ("input_reduce_fusion_50", 690, 60),
               ("memcpy128", 750, 10), ("some_custom_kernel", 760, 5), ("swiglu_grad_pallas_gpu", 765, 20),
               ("logsumexp_pallas_gpu", 785, 15)]
    events = meta + [{"ph": "X", "pid": 7, "tid": 1, "name": n, "ts": t, "dur": d} for n, t, d in kernels]
    events.append({"ph": "X", "pid": 1, "tid": 1, "name": "host work", "ts": 0, "dur": 999})  # not a kernel
    trace = tmp_path / "plugins" / "profile" / "x" / "perfetto_trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    kinds = summarize(tmp_path)["device"]["by_kind"]
    got = {k: round(v["ms_per_step"] * 1e3) for k, v in kinds.items()}
    assert got == {"matmul": 400, "attention": 200, "fusion": 100, "gca": 50, "copy": 10, "other": 5, "swiglu": 20,
                   "log-normaliser": 15}
    assert summarize(tmp_path, traced_steps=2)["device"]["by_kind"]["matmul"]["ms_per_step"] == 0.2
    assert kinds["matmul"]["kernels"] == 2 and list(kinds)[0] == "matmul"
    assert abs(sum(v["share"] for v in kinds.values()) - 1) < 1e-9


def test_trace_summary_finds_the_steps_on_a_main_thread_of_any_name(tmp_path):
    """The step annotations mark the main thread, named "python" or not: the steps, the host phases
    on that thread and the per-step device time all count them."""
    import gzip
    import json

    from drt_jax.train.profiling import summarize

    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "MainThread"}}]
    for i in range(4):
        events.append({"ph": "X", "pid": 1, "tid": 3, "name": "train", "ts": 1000 * i, "dur": 900, "args": {"step_num": str(i)}})
        events.append({"ph": "X", "pid": 1, "tid": 3, "name": "dispatch", "ts": 1000 * i + 10, "dur": 200})
        events.append({"ph": "X", "pid": 7, "tid": 1, "name": "nvjet_gemm", "ts": 1000 * i + 100, "dur": 500})
    events.append({"ph": "X", "pid": 1, "tid": 4, "name": "dispatch", "ts": 0, "dur": 5000})  # another thread
    trace = tmp_path / "plugins" / "profile" / "x" / "perfetto_trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = summarize(tmp_path)
    assert summary["steps"] == 4
    assert summary["host_ms_per_step"] == {"dispatch": 0.2}
    assert summary["device"]["by_kind"]["matmul"]["ms_per_step"] == 0.5


def test_git_commit_is_unknown_for_a_tree_inside_another_repository(tmp_path, monkeypatch):
    """A run folder's git_commit.txt names this project's commit, never that of a repository around an
    exported copy of it; in this checkout it is this checkout's HEAD."""
    import subprocess

    import drt_jax.train.loop as loop

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=loop.REPO_ROOT, capture_output=True, text=True).stdout.strip()
    if head:
        assert loop.git_commit().split("-")[0] == head
    outer = tmp_path / "outer"
    (outer / "tree").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=outer, check=True)
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"], cwd=outer, check=True)
    monkeypatch.setattr(loop, "REPO_ROOT", (outer / "tree").resolve())
    assert loop.git_commit() == "unknown"


def test_an_exported_tree_names_the_commit_it_was_cut_from(tmp_path, monkeypatch):
    """`git archive` expands archive_commit.txt (export-subst), and a tree without its own .git reports
    that commit; the unexpanded placeholder of a checkout, or no file, reads as unknown."""
    import subprocess

    import drt_jax.train.loop as loop

    real = loop.ARCHIVE_COMMIT
    placeholder = real.read_text().strip()
    assert placeholder.startswith("$Format:")
    tree = tmp_path / "tree"
    tree.mkdir()
    monkeypatch.setattr(loop, "REPO_ROOT", tree.resolve())
    file = tree / "archive_commit.txt"
    monkeypatch.setattr(loop, "ARCHIVE_COMMIT", file)
    assert loop.git_commit() == "unknown"
    file.write_text(placeholder + "\n")
    assert loop.git_commit() == "unknown"
    file.write_text("0123abcd" * 5 + "\n")
    assert loop.git_commit() == "0123abcd" * 5

    root = real.parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    listed = subprocess.run(["git", "ls-files", "--error-unmatch", ".gitattributes", "drt_jax/archive_commit.txt"],
                            cwd=root, capture_output=True)
    if head.returncode or listed.returncode:
        return  # not a checkout with the files committed: the archive itself cannot be cut here
    archive = subprocess.run(["git", "archive", "HEAD", "drt_jax/archive_commit.txt"], cwd=root,
                             capture_output=True, check=True).stdout
    (tmp_path / "a.tar").write_bytes(archive)
    subprocess.run(["tar", "-xf", "a.tar"], cwd=tmp_path, check=True)
    assert (tmp_path / "drt_jax" / "archive_commit.txt").read_text().strip() == head.stdout.strip()


def test_trace_kernels_are_named_by_their_hlo_source_and_bytes():
    """A kernel of the trace ("loop_add_fusion_3") is found in the optimized HLO ("loop_add_fusion.3"),
    with the JAX operation of its root, its operands' and result's bytes and the number of fusions
    deduplicated into its kernel; names the HLO lacks (cuBLAS kernels) stay as they are."""
    from drt_jax.train.profiling import attribute

    hlo = "\n".join([
        "  %p.1 = bf16[4,8]{1,0} parameter(0)",
        "  %p.2 = f32[8]{0} parameter(1)",
        '  %loop_add_fusion.3 = f32[4,8]{1,0} fusion(%p.1, %p.2), kind=kLoop, calls=%fc.3, '
        'metadata={op_name="jit(step)/DRT/mlp/add" stack_frame_id=4}',
        '  %loop_add_fusion.4 = f32[4,8]{1,0} fusion(%p.1, %p.2), kind=kLoop, calls=%fc.3, '
        'metadata={deduplicated_name="loop_add_fusion.3"}',
        "  %gca.7 = (bf16[2,3]{1,0}, f32[2]{0}) custom-call(%p.1), custom_call_target=\"__gpu$xla.gpu.triton\"",
    ])
    summary = {"device": {"top_kernels": [{"name": "loop_add_fusion_3", "ms_per_step": 1.0},
                                          {"name": "gca_7", "ms_per_step": 0.5},
                                          {"name": "nvjet_sm90_tst", "ms_per_step": 0.2}]}}
    rows = attribute(summary, hlo)["device"]["top_kernels"]
    assert rows[0]["op_name"] == "jit(step)/DRT/mlp/add"
    assert rows[0]["bytes"] == 4 * 8 * 2 + 8 * 4 + 4 * 8 * 4
    assert rows[0]["instances"] == 2  # loop_add_fusion.4 runs loop_add_fusion.3's kernel
    assert rows[1]["bytes"] == 4 * 8 * 2 + (2 * 3 * 2 + 2 * 4) and rows[1]["op_name"] == ""
    assert rows[1]["instances"] == 1
    assert set(rows[2]) == {"name", "ms_per_step"}
