"""Retrieval inspection: which past chunks each chunk read (with weights), and a heatmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.evaluate.common import EvalError


def inspect_retrieval(cfg, params, tokens: np.ndarray, tokenizer, snippet_chars: int = 60) -> dict:
    from drt_jax.model import DRT

    if not cfg.uses_retrieval:
        raise EvalError(f"model arch {cfg.arch!r} has no retrieval to inspect")
    if len(tokens) < 2 * cfg.chunk_size:
        raise EvalError(f"text of {len(tokens)} tokens is shorter than 2 chunks ({2 * cfg.chunk_size}); give more text")
    _, inter = jax.jit(lambda p, t: DRT(cfg).apply({"params": p}, t, mutable=["intermediates"]))(
        params, jnp.asarray(tokens[None]))
    inter = inter["intermediates"]
    S = cfg.chunk_size
    C = -(-len(tokens) // S)
    text = lambda c: tokenizer.decode([int(x) for x in tokens[c * S : (c + 1) * S]]).replace("\n", " ")[:snippet_chars]
    groups = []
    for g in range(len(cfg.groups)):
        idx = np.asarray(inter[f"retrieval_indices_g{g}"][0])[0]  # [C, K]; row c serves chunk c+1
        w = np.asarray(inter[f"retrieval_weights_g{g}"][0])[0]
        rows = []
        weights = np.zeros((C, C), np.float32)
        for c in range(1, C):
            got = [(int(j), float(x)) for j, x in zip(idx[c - 1], w[c - 1], strict=False) if j >= 0 and x > 0]
            for j, x in got:
                weights[c, j] = x
            rows.append({"chunk": c, "text": text(c),
                         "retrieved": [{"chunk": j, "weight": round(x, 4), "text": text(j)} for j, x in got]})
        groups.append({"group": g, "chunks": rows, "weights": weights.tolist()})
    return {"chunk_size": S, "num_chunks": C, "groups": groups}


def plot_retrieval(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    G = len(result["groups"])
    fig, axes = plt.subplots(1, G, figsize=(5 * G, 4.5), squeeze=False)
    for ax, grp in zip(axes[0], result["groups"], strict=False):
        im = ax.imshow(np.asarray(grp["weights"]), cmap="viridis", vmin=0, vmax=1, origin="upper")
        ax.set_xlabel("retrieved (past) chunk")
        ax.set_ylabel("reading chunk")
        ax.set_title(f"group {grp['group']}: retrieval weights")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
