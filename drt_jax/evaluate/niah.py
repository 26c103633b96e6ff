"""NIAH sweep per (context length, needle depth): exact match of the whole greedy answer, with the
diagnostics that say why -- the teacher-forced loss of the answer tokens and, per retrieval group,
needle-chunk recall@k (are the chunks holding the needle's value among the top-k retrieved for the
chunk that generates the answer?)."""

from __future__ import annotations

import dataclasses

import numpy as np

from drt_jax.diagnostics import chunk_recall
from drt_jax.evaluate.common import EvalError
from drt_jax.tasks.niah import NiahTask, score_exact


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
               offload: str | None = None, batch_size: int = 1, seed: int = 0, progress=None) -> dict:
    """Runs the sweep -> JSON-ready {"accuracy", "answer_loss": {length: {depth: value}}, "needle_recall":
    {"g<g>": {length: {depth: recall}}}, "records": [one per sample], ...}."""
    from drt_jax.inference import InferenceEngine

    if not cfg.uses_retrieval and cfg.arch != "swa" and cfg.arch != "full":
        raise EvalError(f"unsupported arch {cfg.arch}")
    t = NiahTask(task, tokenizer, haystack, cfg.chunk_size, seed=seed)
    for length in lengths:
        t.check_length(length)
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"depth {d} must be in [0, 1]")
    acc: dict = {}
    answer_loss: dict = {}
    recall: dict = {f"g{g}": {} for g in range(len(cfg.groups))}
    records = []
    for length in lengths:
        max_len = length + 64 if cfg.arch == "full" else None
        for table in (acc, answer_loss, *recall.values()):
            table[str(length)] = {}
        for depth in depths:
            rows = []
            for b0 in range(0, samples, batch_size):
                batch = [t.sample(length, depth, i) for i in range(b0, min(samples, b0 + batch_size))]
                eng = InferenceEngine(cfg, params, batch_size=len(batch), offload=offload, max_len=max_len,
                                      max_chunks=length // cfg.chunk_size + 4)
                prompts = np.stack([s.tokens[: s.prompt_len] for s in batch])
                gen, loss, retrieved = answer_diagnostics(eng, prompts, np.stack([s.answer for s in batch]))
                for b, s in enumerate(batch):
                    needle_chunks = s.needle_chunks(cfg.chunk_size)
                    row = {"length": length, "depth": depth, "answer": s.answer.tolist(),
                           "generated": gen[b].tolist(), "correct": score_exact(gen[b], s.answer),
                           "answer_loss": float(loss[b]), "needles": list(s.needle_positions),
                           "needle_chunks": needle_chunks.tolist(),
                           "retrieved": {f"g{g}": retrieved[g, b].tolist() for g in range(len(retrieved))},
                           "recall": {f"g{g}": chunk_recall(retrieved[g, b], needle_chunks) for g in range(len(retrieved))}}
                    rows.append(row)
                if progress is not None:
                    progress(len(batch))
            records.extend(rows)
            acc[str(length)][str(depth)] = float(np.mean([r["correct"] for r in rows]))
            answer_loss[str(length)][str(depth)] = float(np.mean([r["answer_loss"] for r in rows]))
            for g, table in recall.items():
                table[str(length)][str(depth)] = float(np.nanmean([r["recall"][g] for r in rows]))
    return {"task": task, "lengths": list(lengths), "depths": list(depths), "samples_per_cell": samples,
            "offload": offload, "chunk_size": cfg.chunk_size, "top_k": cfg.top_k if cfg.uses_retrieval else None,
            "accuracy": acc, "answer_loss": answer_loss, "needle_recall": recall, "records": records}


def summary_lines(result: dict) -> list[str]:
    """The sweep's tables (accuracy, answer loss, recall per group), depth by length, as text lines."""
    lengths, depths = result["lengths"], result["depths"]
    tables = [("accuracy", result["accuracy"], "{:>8.3f}"), ("answer loss (nats/token)", result["answer_loss"], "{:>8.2f}")]
    tables += [(f"needle-chunk recall@{result['top_k']} {g}", t, "{:>8.2f}") for g, t in result["needle_recall"].items()]
    lines = []
    for title, table, fmt in tables:
        lines.append(f"{title}: depth \\ length " + " ".join(f"{L:>8d}" for L in lengths))
        for d in depths:
            lines.append(f"{d:>14g} " + " ".join(fmt.format(table[str(L)][str(d)]) for L in lengths))
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
