"""NIAH sweep: accuracy per (context length, needle depth), exact match of the whole greedy answer."""

from __future__ import annotations

import numpy as np

from drt_jax.evaluate.common import EvalError
from drt_jax.tasks.niah import NiahTask, score_exact


def niah_sweep(cfg, params, tokenizer, haystack, *, task: str, lengths, depths, samples: int,
               offload: str | None = None, batch_size: int = 1, seed: int = 0, progress=None) -> dict:
    """Runs the sweep; returns {"accuracy": {length: {depth: acc}}, "samples": [...]} (JSON-ready)."""
    from drt_jax.inference import InferenceEngine, generate

    if not cfg.uses_retrieval and cfg.arch != "swa" and cfg.arch != "full":
        raise EvalError(f"unsupported arch {cfg.arch}")
    t = NiahTask(task, tokenizer, haystack, cfg.chunk_size, seed=seed)
    for length in lengths:
        t.check_length(length)
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"depth {d} must be in [0, 1]")
    acc: dict = {}
    records = []
    for length in lengths:
        max_len = length + 64 if cfg.arch == "full" else None
        acc[str(length)] = {}
        for depth in depths:
            hits = 0
            for b0 in range(0, samples, batch_size):
                batch = [t.sample(length, depth, i) for i in range(b0, min(samples, b0 + batch_size))]
                eng = InferenceEngine(cfg, params, batch_size=len(batch), offload=offload, max_len=max_len,
                                      max_chunks=length // cfg.chunk_size + 4)
                prompts = np.stack([s.tokens[: s.prompt_len] for s in batch])
                n_ans = max(len(s.answer) for s in batch)
                gen, _ = generate(eng, prompts, n_ans)
                for s, g in zip(batch, gen, strict=False):
                    ok = score_exact(g, s.answer)
                    hits += ok
                    records.append({"length": length, "depth": depth, "answer": s.answer.tolist(),
                                    "generated": g[: len(s.answer)].tolist(), "correct": bool(ok),
                                    "needles": list(s.needle_positions)})
                if progress is not None:
                    progress(len(batch))
            acc[str(length)][str(depth)] = hits / samples
    return {"task": task, "lengths": list(lengths), "depths": list(depths), "samples_per_cell": samples,
            "offload": offload, "accuracy": acc, "records": records}


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
