"""NIAH sweep per (context length, needle depth): exact match of the whole greedy answer, with the
diagnostics that say why -- the teacher-forced loss of the answer tokens and, per retrieval group,
needle-chunk recall@k (are the chunks holding the needle's value among the top-k retrieved for the
chunk that generates the answer?). The same three are broken down by where the question ends within
its chunk (the sample's offset, drt_jax.tasks.niah), in the buckets of offset_buckets."""

from __future__ import annotations

import dataclasses

import numpy as np

from drt_jax import chunking
from drt_jax.diagnostics import chunk_recall
from drt_jax.evaluate.common import EvalError
from drt_jax.tasks.niah import NiahTask, offset_bucket, offset_buckets, score_exact


def answer_diagnostics(engine, prompts, answers):
    """Prefills prompts [B, T] once, then decodes the answers [B, A] twice: greedily and teacher-forced.

    Returns (generated [B, A] int32, answer_loss [B] float (mean nats per answer token, teacher-forced),
    retrieved [G, B, K] int32: each group's retrieval read by the chunk of the prompt's last token,
    which generates the answer; G = 0 for models without retrieval).
    """
    import jax
    import jax.numpy as jnp

    answers = np.asarray(answers, np.int32)
    B, A = answers.shape
    logits, state = engine.prefill(engine.init_state(), prompts)
    retrieved = (np.asarray(jax.device_get(state.dev.ret_idx)) if engine.cfg.uses_retrieval
                 else np.zeros((0, B, 0), np.int32))
    # The steps donate their device state: the teacher-forced pass runs on a copy. (An answer that crosses
    # a chunk end writes that chunk to a shared host memory; the greedy pass then rewrites it before use.)
    forced = dataclasses.replace(state, dev=jax.tree.map(jnp.copy, state.dev))
    nll = np.zeros(B)
    step_logits = logits
    for i in range(A):
        logp = jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1)
        nll -= np.asarray(jnp.take_along_axis(logp, jnp.asarray(answers[:, i : i + 1]), axis=-1))[:, 0]
        if i + 1 < A:
            step_logits, forced = engine.step(forced, answers[:, i])
    generated = []
    for i in range(A):
        nxt = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        generated.append(nxt)
        if i + 1 < A:
            logits, state = engine.step(state, nxt)
    return np.stack(generated, axis=1), nll / A, retrieved


def niah_sweep(cfg, params, tokenizer, haystack, *, task: str, lengths, depths, samples: int,
               offload: str | None = None, batch_size: int = 1, seed: int = 0, align: str = "random",
               progress=None) -> dict:
    """Runs the sweep -> JSON-ready {"accuracy", "answer_loss": {length: {depth: value}}, "needle_recall":
    {"g<g>": {length: {depth: recall}}}, "by_offset" (offset_breakdown), "records": [one per sample,
    with its offset and the alignment pads the engine put before it], ...}. align: the task's layout
    ("random", "chunk" or "pad"). Prompts are aligned as cfg.prompt_align says, and needle chunk ids
    count the pads. A batch holds samples of one (aligned) prompt length: unaligned prompts at random
    offsets batch less."""
    from drt_jax.inference import InferenceEngine

    if not cfg.uses_retrieval and cfg.arch != "swa" and cfg.arch != "full":
        raise EvalError(f"unsupported arch {cfg.arch}")
    t = NiahTask(task, tokenizer, haystack, cfg.chunk_size, seed=seed, align=align)
    for length in lengths:
        t.check_length(length)
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"depth {d} must be in [0, 1]")
    aligning = cfg.uses_retrieval and cfg.prompt_align == "chunk"

    def pads(n: int) -> int:  # pad ids the engine puts before a prompt of n tokens
        return chunking.prompt_padding(0, n, cfg.chunk_size) if aligning else 0

    acc: dict = {}
    answer_loss: dict = {}
    recall: dict = {f"g{g}": {} for g in range(len(cfg.groups))}
    records = []
    for length in lengths:
        max_len = length + 64 if cfg.arch == "full" else None
        for table in (acc, answer_loss, *recall.values()):
            table[str(length)] = {}
        for depth in depths:
            rows = {}
            for indices in _equal_length_batches(t, length, depth, samples, batch_size, pads):
                batch = [t.sample(length, depth, i) for i in indices]
                eng = InferenceEngine(cfg, params, batch_size=len(batch), offload=offload, max_len=max_len,
                                      max_chunks=length // cfg.chunk_size + 5)
                # The engine's own alignment, done here so that prompts of different lengths that pad
                # to one length share a batch; the engine then adds nothing.
                prompts = np.stack([np.r_[np.full(pads(s.prompt_len), cfg.pad_id, np.int32), s.tokens[: s.prompt_len]]
                                    for s in batch])
                gen, loss, retrieved = answer_diagnostics(eng, prompts, np.stack([s.answer for s in batch]))
                for b, (i, s) in enumerate(zip(indices, batch, strict=True)):
                    needle_chunks = s.needle_chunks(cfg.chunk_size, pads(s.prompt_len))
                    rows[i] = {"length": length, "depth": depth, "offset": s.offset, "pads": pads(s.prompt_len),
                               "answer": s.answer.tolist(),
                               "generated": gen[b].tolist(), "correct": score_exact(gen[b], s.answer),
                               "answer_loss": float(loss[b]), "needles": list(s.needle_positions),
                               "needle_chunks": needle_chunks.tolist(),
                               "retrieved": {f"g{g}": retrieved[g, b].tolist() for g in range(len(retrieved))},
                               "recall": {f"g{g}": chunk_recall(retrieved[g, b], needle_chunks)
                                          for g in range(len(retrieved))}}
                if progress is not None:
                    progress(len(batch))
            cell = [rows[i] for i in sorted(rows)]
            records.extend(cell)
            acc[str(length)][str(depth)] = float(np.mean([r["correct"] for r in cell]))
            answer_loss[str(length)][str(depth)] = float(np.mean([r["answer_loss"] for r in cell]))
            for g, table in recall.items():
                table[str(length)][str(depth)] = float(np.nanmean([r["recall"][g] for r in cell]))
    return {"task": task, "align": align, "prompt_align": cfg.prompt_align if cfg.uses_retrieval else None,
            "lengths": list(lengths), "depths": list(depths),
            "samples_per_cell": samples, "offload": offload, "chunk_size": cfg.chunk_size,
            "top_k": cfg.top_k if cfg.uses_retrieval else None, "accuracy": acc, "answer_loss": answer_loss,
            "needle_recall": recall,
            "offset_buckets": [label for label, _, _ in offset_buckets(cfg.chunk_size)],
            "by_offset": offset_breakdown(records, lengths, cfg.chunk_size, list(recall)),
            "records": records}


def _equal_length_batches(task: NiahTask, length: int, depth: float, samples: int, batch_size: int, pads):
    """Sample indices 0..samples-1 in batches of at most batch_size whose prompts, with their pads(n)
    alignment pads, are equally long (the engine prefills one length per batch), in order of first index."""
    by_len: dict[int, list[int]] = {}
    for i in range(samples):
        n = task.prompt_len(length, depth, i)
        by_len.setdefault(n + pads(n), []).append(i)
    batches = [group[b : b + batch_size] for group in by_len.values() for b in range(0, len(group), batch_size)]
    return sorted(batches)


def offset_breakdown(records, lengths, chunk_size: int, groups) -> dict:
    """Accuracy, answer loss and needle recall per offset bucket (offset_buckets(chunk_size)), for each
    length and over all of them ("all"): {"samples": {length: {bucket: n}}, "accuracy": {length: {bucket:
    value}}, "answer_loss": ..., "needle_recall": {group: {length: {bucket: value}}}}. A value is None
    where the bucket has no sample (or, for recall, no sample with needle chunks)."""
    labels = [label for label, _, _ in offset_buckets(chunk_size)]
    cells: dict = {}
    for r in records:
        bucket = offset_bucket(r["offset"], chunk_size)
        for key in (str(r["length"]), "all"):
            cells.setdefault((key, bucket), []).append(r)
    out: dict = {"samples": {}, "accuracy": {}, "answer_loss": {}, "needle_recall": {g: {} for g in groups}}
    for key in [str(L) for L in lengths] + ["all"]:
        rows = {b: cells.get((key, b), []) for b in labels}
        out["samples"][key] = {b: len(rows[b]) for b in labels}
        out["accuracy"][key] = {b: _mean([float(r["correct"]) for r in rows[b]]) for b in labels}
        out["answer_loss"][key] = {b: _mean([r["answer_loss"] for r in rows[b]]) for b in labels}
        for g in groups:
            out["needle_recall"][g][key] = {b: _mean([r["recall"][g] for r in rows[b]]) for b in labels}
    return out


def _mean(values) -> float | None:
    """Mean of the values that are not NaN; None where there are none."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else None


def summary_lines(result: dict) -> list[str]:
    """The sweep's tables (accuracy, answer loss, recall per group), depth by length, then the same by
    offset bucket (rows with samples only; "all" when there are several lengths), as text lines."""
    lengths, depths = result["lengths"], result["depths"]
    tables = [("accuracy", result["accuracy"], "{:>8.3f}"), ("answer loss (nats/token)", result["answer_loss"], "{:>8.2f}")]
    tables += [(f"needle-chunk recall@{result['top_k']} {g}", t, "{:>8.2f}") for g, t in result["needle_recall"].items()]
    lines = []
    for title, table, fmt in tables:
        lines.append(f"{title}: depth \\ length " + " ".join(f"{L:>8d}" for L in lengths))
        for d in depths:
            lines.append(f"{d:>14g} " + " ".join(fmt.format(table[str(L)][str(d)]) for L in lengths))
    by = result.get("by_offset")
    if by is None:  # results written before offsets were recorded
        return lines
    groups = list(by["needle_recall"])
    lines.append(f"by the question's offset in its chunk of {result['chunk_size']} tokens ({result.get('align')} layout):")
    lines.append(f"{'length':>8} {'offset':>8} {'n':>5} {'accuracy':>8} {'loss':>8} "
                 + " ".join(f"{'recall ' + g:>9}" for g in groups))
    keys = [str(L) for L in lengths] + (["all"] if len(lengths) > 1 else [])
    num = lambda v, fmt: fmt.format(v) if v is not None else f"{'-':>{len(fmt.format(0.0))}}"
    for key in keys:
        for b in result["offset_buckets"]:
            n = by["samples"][key][b]
            if n:
                lines.append(f"{key:>8} {b:>8} {n:>5} {num(by['accuracy'][key][b], '{:>8.3f}')} "
                             f"{num(by['answer_loss'][key][b], '{:>8.2f}')} "
                             + " ".join(num(by["needle_recall"][g][key][b], "{:>9.2f}") for g in groups))
    return lines


def plot_heatmap(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = result["lengths"], result["depths"]
    grid = np.array([[result["accuracy"][str(L)][str(d)] for L in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.6 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"NIAH {result['task']}: exact-match accuracy")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
