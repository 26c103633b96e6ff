"""Where does a trained DRT's passkey copy break: the retrieval, the GCA attention, or the GCA output?

    python experiments/gca_probe.py --checkpoint runs/drt-20m-niah2k --length 512 --samples 48

On NIAH-single samples (or 2-hop with --task 2hop; held-out haystacks, uniform depth) the checkpoint runs three times, eagerly:
  normal        the model as trained (no Gumbel noise);
  gca-off       every GCA block outputs zero (the chunk memory is never read);
  random-ret    each chunk's retrieval is k visible chunks drawn at random, weighted uniformly.
For each run it reports the teacher-forced answer loss, split into samples whose needle is inside the
sliding window of the first answer-predicting token and samples that need the chunk memory. For the
normal run it also reports, at the positions that predict answer token i (from the question's last
token on), what the chunk memory offers the copy:
  w_needle      the retrieval weight on the chunk that holds passkey token i (0 when not retrieved),
                against 1 / (number of chunks retrieved): uniform;
  gca_mass      per upper layer, the GCA attention probability (best head) on the slot of passkey
                token i inside its chunk, against 1 / S: uniform over the chunk's tokens.
  needle_share  per upper layer, the needle chunk's share of the GCA output (the weighted per-chunk
                outputs' norms, in the head that attends most to the passkey): low when the other
                retrieved chunks' outputs compete with the needle's.
A model that copies through GCA needs gca_mass near 1 in some layer and w_needle well above uniform;
a gca-off answer loss equal to the normal one says the memory contributes nothing to the answer.
With --lm-windows N it also compares held-out language-model loss (N windows of --lm-length tokens) for
the three runs: how much the trained model uses its memory at all; how far back the retrievals reach
and how evenly their weight spreads over the K chunks;
and how much of evaluation's clean top-k the training-time Gumbel-top-k selection shares
(`training_noise`: the scores' spread against the noise's).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import drt_jax.layers as layers_mod  # noqa: E402
import drt_jax.retrieval as retrieval_mod  # noqa: E402
from drt_jax.data import load_tokenizer  # noqa: E402
from drt_jax.data.shards import split_tokens  # noqa: E402
from drt_jax.model import DRT  # noqa: E402
from drt_jax.tasks.niah import NiahTask  # noqa: E402
from drt_jax.train.checkpoints import load_for_eval, read_run_config  # noqa: E402

MODES = ("normal", "gca-off", "random-ret")


@contextlib.contextmanager
def patched(mode: str, records: list, seed: int = 0, scores: list | None = None):
    """Runs the model with GCA recorded (normal), zeroed (gca-off) or fed random retrievals; `scores`
    (normal mode) collects every retrieval's score matrix [B, C, M]."""
    gca, topk = layers_mod.grouped_cross_attention, retrieval_mod.causal_topk
    rng = np.random.default_rng(seed)

    def gca_hook(q, k_mem, v_mem, indices, weights, **kw):
        out = gca(q, k_mem, v_mem, indices, weights, **kw)
        if mode == "normal":
            records.append(dict(q=np.asarray(q, np.float32), k=np.asarray(k_mem, np.float32),
                                v=np.asarray(v_mem, np.float32), indices=np.asarray(indices),
                                weights=np.asarray(weights, np.float32),
                                off_by_one=bool(kw.get("softmax_off_by_one", False))))
        return jnp.zeros_like(out) if mode == "gca-off" else out

    def random_topk(scores, k, **kw):
        idx, w = topk(scores, k, **kw)
        B, C, M = scores.shape
        new_idx = np.full((B, C, k), -1, np.int32)
        new_w = np.zeros((B, C, k), np.float32)
        for c in range(1, C):
            n = min(k, c)
            for b in range(B):
                new_idx[b, c, :n] = rng.choice(c, n, replace=False)
                new_w[b, c, :n] = 1.0 / n
        return jnp.asarray(new_idx), jnp.asarray(new_w, w.dtype)

    def recording_topk(scores_in, k, **kw):
        scores.append(np.asarray(scores_in, np.float32))
        return topk(scores_in, k, **kw)

    layers_mod.grouped_cross_attention = gca_hook
    if mode == "random-ret":
        retrieval_mod.causal_topk = random_topk
    elif scores is not None:
        retrieval_mod.causal_topk = recording_topk
    try:
        yield
    finally:
        layers_mod.grouped_cross_attention, retrieval_mod.causal_topk = gca, topk


def token_logprobs(model, params, tokens) -> np.ndarray:
    """tokens [B, T] -> log p(tokens[:, t + 1] | ..t) [B, T - 1] (float32)."""
    logits = model.apply({"params": params}, jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = jnp.asarray(tokens[:, 1:])
    return np.asarray(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])


def chunk_attention(q, keys, off_by_one: bool):
    """GCA's attention of one query over one retrieved chunk, per head: q [H, Dh], keys [S, Hkv, Dh]
    -> probabilities [H, S] (with off_by_one the missing mass went to "nothing")."""
    H = q.shape[0]
    keys = np.repeat(keys, H // keys.shape[1], axis=1)
    logits = np.einsum("hd,shd->hs", q, keys) / np.sqrt(q.shape[-1])
    m = np.maximum(logits.max(axis=1, keepdims=True), 0.0 if off_by_one else -np.inf)
    e = np.exp(logits - m)
    return e / (e.sum(axis=1, keepdims=True) + (np.exp(-m) if off_by_one else 0.0))


def copy_sources(sample) -> list[tuple[int, int]]:
    """(answer index, needle token position) for every answer token copied from a needle. Single: the
    passkey's tokens in order. 2-hop: v1's tokens, then (after the two "->" tokens of the answer) v2's."""
    keys = sample.key_positions
    if len(keys) == len(sample.answer):
        return list(enumerate(keys))
    half = len(keys) // 2
    return [(j if j < half else j + len(sample.answer) - len(keys), pos) for j, pos in enumerate(keys)]


def gca_stats(records, samples, S: int):
    """Retrieval weight on the needle's chunk and the best head's GCA attention on the passkey slot, at
    the positions predicting each answer token, for each upper layer."""
    w_needle, w_uniform, mass = [], [], {i: [] for i in range(len(records))}
    for b, s in enumerate(samples):
        for i, key_pos in copy_sources(s):
            pred = s.prompt_len - 1 + i  # the position whose next token is answer token i
            c, slot = divmod(pred, S)
            kc, kslot = divmod(key_pos, S)
            rec0 = records[0]
            idx, w = rec0["indices"][b, c], rec0["weights"][b, c]
            hit = np.flatnonzero(idx == kc)
            w_needle.append(float(w[hit[0]]) if hit.size else 0.0)
            w_uniform.append(1.0 / max(1, int(np.sum(idx >= 0))))
            for li, rec in enumerate(records):
                if not hit.size:
                    mass[li].append(0.0)
                    continue
                probs = chunk_attention(rec["q"][b, c, slot], rec["k"][b, kc], rec["off_by_one"])
                mass[li].append(float(probs[:, kslot].max()))
    return (float(np.mean(w_needle)), float(np.mean(w_uniform)),
            {f"layer{li}": float(np.mean(v)) for li, v in mass.items()})


def needle_share(records, samples, S: int) -> dict:
    """Per upper layer, how much of the GCA output comes from the needle's chunk, at the positions
    predicting each answer token whose needle chunk was retrieved. Each retrieved chunk j contributes
    w_j * softmax(q K_j / sqrt(D)) V_j; in the head that attends most to the passkey slot, the
    needle's share is |needle contribution| / sum over chunks of |contribution| (1: no competition;
    w_needle: every chunk's output equally strong)."""
    share = {i: [] for i in range(len(records))}
    for b, s in enumerate(samples):
        for i, key_pos in copy_sources(s):
            c, slot = divmod(s.prompt_len - 1 + i, S)
            kc, kslot = divmod(key_pos, S)
            for li, rec in enumerate(records):
                idx, w = rec["indices"][b, c], rec["weights"][b, c]
                if not np.any(idx == kc):
                    continue
                q = rec["q"][b, c, slot]  # [H, Dh]
                norms, needle_mass = [], None
                for j, wj in zip(idx, w, strict=True):
                    if j < 0:
                        continue
                    probs = chunk_attention(q, rec["k"][b, j], rec["off_by_one"])  # [H, S]
                    v = np.repeat(rec["v"][b, j], q.shape[0] // rec["v"].shape[3], axis=1)  # [S, H, Dh]
                    norms.append(np.linalg.norm(wj * np.einsum("hs,shd->hd", probs, v), axis=-1))  # [H]
                    if j == kc:
                        needle_at, needle_mass = len(norms) - 1, probs[:, kslot]
                head = int(np.argmax(needle_mass))
                total = sum(n[head] for n in norms)
                share[li].append(float(norms[needle_at][head] / total) if total > 0 else 0.0)
    return {f"layer{li}": float(np.mean(v)) if v else None for li, v in share.items()}


def retrieval_reach(records, cfg) -> dict:
    """Distance (in chunks) from each consuming chunk back to the chunks it reads through GCA, and the
    fraction of them the sliding window already covers (distance <= W / (S + 1) chunks). With the
    records' weights, also how the retrieval weight spreads over the K chunks: the mean of each row's
    weights sorted high to low, over rows that read K chunks (uniform: 1 / K in every place)."""
    dist, spread = [], []
    for rec in records:
        idx = rec["indices"]  # [B, C, K]: row c is what chunk c reads
        c = np.arange(idx.shape[1])[None, :, None]
        dist.append((c - idx)[idx >= 0])
        if "weights" in rec:
            full = (idx >= 0).all(axis=-1)
            spread.append(-np.sort(-np.asarray(rec["weights"], np.float32)[full], axis=-1))
    dist = np.concatenate(dist)
    reach = cfg.window // cfg.slots_per_chunk
    out = {"mean_distance": float(dist.mean()), "median_distance": float(np.median(dist)),
           "frac_within_window": float(np.mean(dist <= reach)), "window_chunks": int(reach)}
    rows = np.concatenate(spread) if spread else np.empty((0, 0))
    if len(rows):
        out["weights_sorted_mean"] = [float(w) for w in rows.mean(axis=0)]
        out["weight_uniform"] = 1.0 / rows.shape[-1]
    return out


def noise_against_scores(score_mats, k: int, scale: float, draws: int = 20, seed: int = 0) -> dict:
    """How far training's Gumbel-top-k selection strays from evaluation's clean top-k, for rows that see
    at least 2k chunks: the scores' spread over the visible chunks, and the mean overlap of the noisy
    and the clean top-k (1: training reads what evaluation reads; k / visible: a random choice)."""
    rng = np.random.default_rng(seed)
    spread, overlap, chance = [], [], []
    for mat in score_mats:
        for row_block in mat:
            for c in range(2 * k, row_block.shape[0]):
                row = row_block[c, :c]
                spread.append(row.std())
                clean = set(np.argsort(-row)[:k].tolist())
                for _ in range(draws):
                    noisy = row + scale * rng.gumbel(size=row.shape)
                    overlap.append(len(clean & set(np.argsort(-noisy)[:k].tolist())) / k)
                chance.append(k / c)
    return {"gumbel_scale": scale, "score_std": float(np.mean(spread)), "noise_std": float(scale * np.pi / np.sqrt(6)),
            "overlap_noisy_clean": float(np.mean(overlap)), "overlap_random": float(np.mean(chance))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--task", default="single", choices=["single", "2hop"],
                   help="NIAH kind; 2hop scores all 12 answer tokens and reads group 0's retrieval for w_needle")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--data", default=None, help="haystack corpus (default: the run's)")
    p.add_argument("--lm-windows", type=int, default=0)
    p.add_argument("--lm-length", type=int, default=2048)
    p.add_argument("--modes", default=",".join(MODES), help=f"which runs, of {','.join(MODES)}")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes {args.modes!r}: choose from {','.join(MODES)}")

    cfg, params, _ = load_for_eval(args.checkpoint)
    run = read_run_config(args.checkpoint)
    data = run.data if args.data is None else dataclasses.replace(run.data, corpus=args.data)
    tok = load_tokenizer(run.data.tokenizer)
    model = DRT(cfg)
    S = cfg.chunk_size
    hay = split_tokens(data, tok, "val", 1 << 21)
    task = NiahTask(args.task, tok, hay, S, seed=12345, align="chunk")  # batches share one prompt length
    samples = [task.sample(args.length, float(d), i)
               for i, d in enumerate(np.random.default_rng(0).random(args.samples))]
    in_window = np.array([s.prompt_len - 1 - min(s.key_positions) < cfg.window - cfg.window // S for s in samples])
    result = {"checkpoint": args.checkpoint, "task": args.task, "length": args.length, "samples": args.samples,
              "in_window_samples": int(in_window.sum()), "chance": float(np.log(len(task.alphabet)))}
    A = len(samples[0].answer)  # single: the passkey; 2hop: v1 "->" v2
    for mode in modes:
        records, losses = [], []
        for start in range(0, len(samples), args.batch):
            part = samples[start:start + args.batch]
            tokens = np.stack([s.tokens for s in part])
            recs: list = []
            with patched(mode, recs):
                lp = token_logprobs(model, params, tokens)
            t0 = part[0].prompt_len
            losses.extend((-lp[:, t0 - 1:t0 - 1 + A].mean(axis=1)).tolist())
            if mode == "normal":
                records.append((part, recs))
        losses = np.asarray(losses)
        row = {"answer_loss_in_window": float(losses[in_window].mean()) if in_window.any() else None,
               "answer_loss_beyond_window": float(losses[~in_window].mean()) if (~in_window).any() else None}
        if mode == "normal":
            stats = [gca_stats(recs, part, S) for part, recs in records]
            n = [len(part) for part, _ in records]
            row["w_needle"] = float(np.average([s[0] for s in stats], weights=n))
            row["w_uniform"] = float(np.average([s[1] for s in stats], weights=n))
            row["gca_mass"] = {k: float(np.average([s[2][k] for s in stats], weights=n)) for k in stats[0][2]}
            row["gca_mass_uniform"] = 1.0 / S
            shares = [needle_share(recs, part, S) for part, recs in records]
            row["needle_share"] = {k: float(np.average([sh[k] for sh in shares], weights=n))
                                   for k in shares[0] if all(sh[k] is not None for sh in shares)}
        result[mode] = row
        print(mode, json.dumps(row), flush=True)
    if args.lm_windows:
        stream = split_tokens(data, tok, "val", args.lm_windows * args.lm_length)
        windows = stream[: args.lm_windows * args.lm_length].reshape(args.lm_windows, args.lm_length)
        for mode in modes:
            recs: list = []
            score_mats: list = []
            with patched(mode, recs, scores=score_mats if mode == "normal" else None):
                lp = np.concatenate([token_logprobs(model, params, windows[i:i + 1]) for i in range(len(windows))])
            result[mode]["lm_loss"] = float(-lp.mean())
            print(mode, "held-out LM loss", round(result[mode]["lm_loss"], 4), flush=True)
            if mode == "normal":
                # Group 0's retrievals (the first record of each window): how far back do they reach?
                result[mode]["lm_retrieval"] = retrieval_reach(recs[:: len(recs) // len(windows)], cfg)
                print(mode, "retrieval reach", json.dumps(result[mode]["lm_retrieval"]), flush=True)
                result[mode]["training_noise"] = noise_against_scores(score_mats, cfg.top_k, cfg.gumbel_scale)
                print(mode, "training noise", json.dumps(result[mode]["training_noise"]), flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
