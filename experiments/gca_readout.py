"""How fast does a DRT learn to read a token out of a retrieved chunk? A CPU-sized control for issue 9.

    python experiments/gca_readout.py --steps 800 --seeds 0,1,2 --wiring authors,standard
    python experiments/gca_readout.py --steps 800 --seeds 0,1,2 --wiring authors --window 64   # control
    python experiments/gca_readout.py --steps 1500 --seeds 0 --wiring standard --warmup 4:2:800  # curriculum
    python experiments/gca_readout.py --chunks 4 --top-k 2 --pairs 2 --noise-filler --seeds 0  # content-matched

Each sequence: a fresh random key of 4 letters at the start, constant filler, the key again at the end.
The key lies far beyond the sliding window, and nothing else in the sequence varies, so the answer can
come only through retrieval + GCA. Unlike tests/test_model.py's fixed batch, every step draws new keys,
so the model cannot memorise them: it must read the key's tokens out of the retrieved chunk. Reports the
answer loss (chance ln 26 = 3.26) every --log steps and the first step at which it falls below
--target, per wiring and seed; writes JSON with --out. With --pairs N the memory holds N key-value
pairs and the row ends with one key and its value: the read-out must match the query's key, as
multi-key and 2-hop NIAH need (the passkey task has a constant cue instead). There the query's key
sits in the answer's own chunk, so the answer's retrieval (chosen by the chunk before) cannot depend on
it and only the read-out can match it. With --query-before-chunk each pair has its own chunk and the
query's key ends the chunk before the answer's, as a NIAH question that ends on the chunk grid does:
the retrieval weights can then pick the queried pair's chunk. Runs with --pairs end with the answer
loss on fresh rows and, in that layout, the answer chunk's retrieval weight on the queried pair's chunk
(w_queried).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from drt_jax.config import ModelConfig  # noqa: E402
from drt_jax.losses import next_token_loss  # noqa: E402
from drt_jax.model import DRT  # noqa: E402

KEY_LEN = 4
CHUNK_SIZE = 7


def smeared_encoder_class():
    """The model's ChunkEncoder with "smeared" memory keys (Olsson et al. 2022): each key becomes
    sigmoid(a) k_t + (1 - sigmoid(a)) k_(t-1) within its chunk, with a learned a per kv head, so a key
    also tells which token precedes it. An experiment-only variant, not a model option."""
    import flax.linen as nn

    import drt_jax.layers as layers

    class SmearedChunkEncoder(nn.Module):
        cfg: ModelConfig
        deterministic: bool = True
        kernel_mesh: object = None

        @nn.compact
        def __call__(self, u):
            landmark_keys, k_mem, v_mem = layers.ChunkEncoder(self.cfg, self.deterministic, self.kernel_mesh,
                                                              name="base")(u)
            gate = jax.nn.sigmoid(self.param("smear", nn.initializers.zeros, (self.cfg.kv_heads,)))[:, None]
            previous = jnp.pad(k_mem[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))
            return landmark_keys, gate * k_mem + (1.0 - gate) * previous, v_mem

    return SmearedChunkEncoder


MARKER = 35  # '#'


def max_pairs(T: int) -> int:
    """How many key-value pairs (1 + KEY_LEN tokens each) fit in the first half of T tokens."""
    return T // 2 // (1 + KEY_LEN)


def filler(rng, B: int, T: int, noise: bool) -> np.ndarray:
    """[B, T] int32 filler: constant 'a', or random lower-case letters with `noise`."""
    return rng.integers(97, 123, size=(B, T)).astype(np.int32) if noise else np.full((B, T), 97, np.int32)


def pair_start(j: int, query_before: bool) -> int:
    """Slot of pair j's key: packed from slot 0, or (query_before) at the start of chunk j."""
    return j * CHUNK_SIZE if query_before else j * (1 + KEY_LEN)


def answer_start(T: int, query_before: bool) -> int:
    """First slot of the answer (the queried value) in a row of T tokens. query_before: the key ends
    chunk C-2 and a '#' cue opens chunk C-1, so every answer token is predicted inside chunk C-1, whose
    retrieval the chunk of the key chose."""
    return T - CHUNK_SIZE + 1 if query_before else T - KEY_LEN


def pairs_batch(rng, B: int, T: int, pairs: int, noise: bool = False, query_before: bool = False) -> np.ndarray:
    """[B, T] int32, the content-matched read-out (what multi-key and 2-hop NIAH need): `pairs`
    key-value pairs from slot 0, each a capital-letter key (distinct within a row) and a 4-letter
    capital value; the row ends with one of the keys and its value. With more than one pair the
    retrieved memory holds several values after a key, and only matching the query's key finds the
    right one; with one pair any copy "after a key" works, as in the fixed-cue task. query_before:
    pair j at the start of chunk j, the query's key on the last slot of chunk C-2, then '#' and the
    value (answer_start); the rest of the row is filler."""
    if query_before:
        if pairs > T // CHUNK_SIZE - 2:
            raise ValueError(f"{pairs} pairs, one per chunk, do not fit before the query's two chunks in {T} tokens")
    elif pairs > max_pairs(T):
        raise ValueError(f"{pairs} pairs do not fit in the first half of {T} tokens")
    tokens = filler(rng, B, T, noise)
    start = answer_start(T, query_before)
    for b in range(B):
        keys = rng.permutation(26)[:pairs] + 65
        values = rng.integers(0, 26, size=(pairs, KEY_LEN)) + 65
        for j in range(pairs):
            at = pair_start(j, query_before)
            tokens[b, at] = keys[j]
            tokens[b, at + 1:at + 1 + KEY_LEN] = values[j]
        q = rng.integers(pairs)
        if query_before:
            tokens[b, start - 2] = keys[q]
            tokens[b, start - 1] = MARKER
        else:
            tokens[b, start - 1] = keys[q]
        tokens[b, start:start + KEY_LEN] = values[q]
    return tokens


def queried_chunk(tokens, pairs: int) -> np.ndarray:
    """[B] in the query_before layout, the chunk of the queried pair (the one whose key the query repeats)."""
    query = tokens[:, answer_start(tokens.shape[1], True) - 2]
    slots = np.array([pair_start(j, True) for j in range(pairs)])
    return slots[np.argmax(tokens[:, slots] == query[:, None], axis=1)] // CHUNK_SIZE


def batch(rng, B: int, T: int, random_offset: bool = False, marker: bool = False, noise: bool = False,
          pairs: int = 0, query_before: bool = False) -> np.ndarray:
    """[B, T] int32: 'a' filler with a random capital-letter key at 1..4 (or, with random_offset, at a
    random place in the first half) and again in the last 4 slots. With `marker`, a '#' precedes both
    copies of the key, as "the pass key is" does in NIAH, so every answer token has a cue. With `noise`
    the filler is random lower-case letters instead of 'a': a constant filler lets the LM loss pull the
    tied embeddings of the unpredictable capitals together (pairwise cosine 0.7 after 400 steps at lr
    3e-3), after which no memory key tells a key letter from the filler. pairs > 0: `pairs_batch`."""
    if pairs:
        return pairs_batch(rng, B, T, pairs, noise, query_before)
    tokens = filler(rng, B, T, noise)
    key = rng.integers(0, 26, size=(B, KEY_LEN)) + 65
    first = 1 + int(marker)
    starts = rng.integers(first, T // 2 - KEY_LEN, size=B) if random_offset else np.full(B, first)
    for b in range(B):
        tokens[b, starts[b]:starts[b] + KEY_LEN] = key[b]
        if marker:
            tokens[b, starts[b] - 1] = MARKER
    tokens[:, -KEY_LEN:] = key
    if marker:
        tokens[:, -KEY_LEN - 1] = MARKER
    return tokens


def answer_loss(logits, tokens, query_before: bool = False):
    """Mean loss of the KEY_LEN answer tokens from answer_start (the key's or the value's copy):
    logits [B, T, V], tokens [B, T]."""
    start = answer_start(tokens.shape[1], query_before)
    logp = jax.nn.log_softmax(logits[:, start - 1:start - 1 + KEY_LEN].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, start:start + KEY_LEN, None], axis=-1))


def pairs_probe(cfg: ModelConfig, params, T: int, pairs: int, *, batch_size: int, seed: int, noise: bool,
                query_before: bool) -> dict:
    """Trained parameters on fresh pair rows, without retrieval noise: the answer loss and, with
    query_before (one pair per chunk), the answer chunk's retrieval weight on the queried pair's chunk
    (w_queried; 1/pairs where the weights do not tell the keys apart and every pair's chunk is
    fetched). Packed pairs share chunks, so no chunk is the queried pair's alone: answer loss only."""
    tokens = batch(np.random.default_rng(seed + 7), batch_size, T, noise=noise, pairs=pairs, query_before=query_before)
    logits, state = DRT(cfg).apply({"params": params}, jnp.asarray(tokens), mutable=["intermediates"])
    loss = float(answer_loss(logits, tokens, query_before))
    if not query_before:
        return {"answer_loss": loss}
    return {"answer_loss": loss, "w_queried": answer_chunk_retrieval(state, queried_chunk(tokens, pairs))[0]}


def answer_chunk_retrieval(state, chunk) -> tuple[float, float]:
    """(mean weight, recall) of `chunk` [B] in the retrieval the last chunk (the answer's) reads: row
    C-2 of the model's retrieval intermediates."""
    idx = np.asarray(state["intermediates"]["retrieval_indices_g0"][0])[:, -2]
    w = np.asarray(state["intermediates"]["retrieval_weights_g0"][0])[:, -2]
    hit = idx == np.asarray(chunk)[:, None]
    return float(np.mean(np.sum(w * hit, axis=1))), float(np.mean(hit.any(axis=1)))


def train(stages: list[tuple[ModelConfig, int, int]], *, batch_size: int, lr: float, seed: int, log: int, gumbel: bool,
          random_offset: bool = False, marker: bool = False, noise: bool = False, pairs: int = 0,
          query_before: bool = False):
    """stages: (model config, tokens per sequence, steps[, pairs]), trained in order with one set of
    parameters and one optimizer state (a curriculum); a stage's own `pairs` overrides the argument.
    Returns ([(global step, mean answer loss)] every `log` steps, the trained parameters)."""
    rng = np.random.default_rng(seed)
    first_cfg, first_T, _, *first_pairs = stages[0]
    init_tokens = batch(rng, 1, first_T, pairs=first_pairs[0] if first_pairs else pairs, query_before=query_before)
    params = DRT(first_cfg).init(jax.random.PRNGKey(seed), jnp.asarray(init_tokens))["params"]
    opt = optax.adam(lr)
    state = opt.init(params)
    curve, key, window, i = [], jax.random.PRNGKey(seed + 1000), [], 0
    for cfg, T, steps, *stage_pairs in stages:
        model = DRT(cfg)
        rows_pairs = stage_pairs[0] if stage_pairs else pairs

        def losses(p, tokens, key, model=model, cfg=cfg):
            logits = model.apply({"params": p}, tokens, deterministic=not gumbel, rngs={"gumbel": key} if gumbel else None)
            answer = answer_loss(logits, tokens, query_before)
            return next_token_loss(logits, tokens, cfg.pad_id)[0] + answer, answer

        @jax.jit
        def step(p, s, tokens, key, losses=losses):
            (_, answer), g = jax.value_and_grad(losses, has_aux=True)(p, tokens, key)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, answer

        for _ in range(steps):
            i += 1
            key, sub = jax.random.split(key)
            tokens = jnp.asarray(batch(rng, batch_size, T, random_offset, marker, noise, rows_pairs, query_before))
            params, state, answer = step(params, state, tokens, sub)
            window.append(float(answer))
            if i % log == 0:
                curve.append((i, float(np.mean(window))))
                window = []
    return curve, params


def length_sweep(cfg: ModelConfig, params, chunks_list, *, batch_size: int, seed: int, random_offset: bool = False,
                 marker: bool = False, noise: bool = False) -> list[dict]:
    """Trained parameters at other lengths, without retrieval noise: per number of chunks, the answer
    loss, the retrieval weight on the key's chunk in the answer chunk's retrieval (w_needle) and
    whether that chunk is retrieved at all (recall)."""
    model = DRT(cfg)
    rng = np.random.default_rng(seed + 7)
    rows = []
    for chunks in chunks_list:
        T = chunks * cfg.chunk_size
        tokens = batch(rng, batch_size, T, random_offset, marker, noise)
        logits, state = model.apply({"params": params}, jnp.asarray(tokens), mutable=["intermediates"])
        answer = float(answer_loss(logits, tokens))
        capitals = (tokens[:, : T // 2] >= 65) & (tokens[:, : T // 2] <= 90)
        w_needle, recall = answer_chunk_retrieval(state, np.argmax(capitals, axis=1) // cfg.chunk_size)
        rows.append({"chunks": chunks, "answer_loss": answer, "w_needle": w_needle, "recall": recall})
    return rows


def answer_grad_norms(cfg: ModelConfig, *, batch_size: int, T: int, seed: int, random_offset: bool) -> dict:
    """Norms of the answer loss's gradient at initialisation for the attention-pattern parameters:
    GCA query and memory key against the self-attention queries and keys, and the value paths."""
    import flax.linen as nn

    model = DRT(cfg)
    tokens = jnp.asarray(batch(np.random.default_rng(seed), batch_size, T, random_offset))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"])

    def answer(p):
        return answer_loss(model.apply({"params": p}, tokens), tokens)

    grads = jax.grad(answer)(params)
    wanted = {"gca q": ("group0_layer_0", "gca", "q"), "memory k": ("encoder", "mem_k"),
              "gca o": ("group0_layer_0", "gca", "o"), "memory v": ("encoder", "mem_v"),
              "upper self-attention q": ("group0_layer_0", "attn", "q"), "upper self-attention k": ("group0_layer_0", "attn", "k"),
              "lower self-attention q": ("lower_0", "attn", "q"), "lower self-attention k": ("lower_0", "attn", "k")}
    out = {}
    for label, path in wanted.items():
        node = grads
        for key in path:
            node = node[key]
        out[label] = float(jnp.linalg.norm(node["kernel"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunks", type=int, default=8, help="sequence length in chunks of 7 tokens")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="1e-3: at 3e-3 this d-64 model's tied embeddings of the key letters collapse")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--wiring", default="authors,standard")
    p.add_argument("--gumbel-scale", type=float, default=1.0)
    p.add_argument("--window", type=int, default=8,
                   help="sliding window in slots; 8 keeps the key out of reach, >= 64 puts it in plain attention (control)")
    p.add_argument("--top-k", type=int, default=2, help="retrieved chunks; >= 6 retrieves every chunk the answer can see")
    p.add_argument("--random-offset", action="store_true",
                   help="put the key at a random place in the first half: no fixed offset for plain attention to use")
    p.add_argument("--marker", action="store_true", help="a '#' precedes the key and the answer (a cue for every answer token)")
    p.add_argument("--noise-filler", action="store_true", help="random lower-case filler instead of constant 'a'")
    p.add_argument("--pairs", type=int, default=0,
                   help="N > 0: N key-value pairs from slot 0, the row ending with one key and its value (content-matched read-out)")
    p.add_argument("--warmup-pairs", type=int, default=None,
                   help="key-value pairs in the --warmup stage (default: --pairs), e.g. 1 before --pairs 2")
    p.add_argument("--query-before-chunk", action="store_true",
                   help="with --pairs: one pair per chunk, the query's key ending the chunk before the answer's, so that "
                        "the retrieval weights can pick the queried pair")
    p.add_argument("--encoder-layers", type=int, default=1,
                   help="chunk-encoder layers (drt-20m has 2; in-chunk attention can learn previous-token features)")
    p.add_argument("--smeared-memory", action="store_true",
                   help="memory keys also see the previous slot (experiment-only encoder variant)")
    p.add_argument("--grad-norms", action="store_true",
                   help="only print the answer-gradient norms of the attention parameters at initialisation")
    p.add_argument("--warmup", default=None, metavar="CHUNKS:TOP_K:STEPS",
                   help="a first stage with fewer chunks / retrieved chunks (a curriculum); --steps follow it")
    p.add_argument("--eval-chunks", default="",
                   help="after training, the answer loss and the key chunk's retrieval weight at these lengths (e.g. 8,16,32,64)")
    p.add_argument("--log", type=int, default=25)
    p.add_argument("--target", type=float, default=1.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        warmup = tuple(int(x) for x in args.warmup.split(":")) if args.warmup else None
        eval_chunks = [int(c) for c in args.eval_chunks.split(",")] if args.eval_chunks else []
    except ValueError:
        p.error(f"--warmup {args.warmup!r} / --eval-chunks {args.eval_chunks!r}: want CHUNKS:TOP_K:STEPS and N,N,... (integers)")
    if warmup is not None and (len(warmup) != 3 or min(warmup) < 1):
        p.error(f"--warmup {args.warmup!r}: want three positive integers CHUNKS:TOP_K:STEPS, e.g. 4:2:800")
    if any(c < 3 for c in eval_chunks):
        p.error(f"--eval-chunks {args.eval_chunks!r}: every length needs at least 3 chunks (key, filler, answer)")
    if args.log < 1 or args.steps + (warmup[2] if warmup else 0) < args.log:
        p.error(f"--log {args.log}: the loss is averaged over --log steps; give 1 <= --log <= the steps trained")
    if args.encoder_layers < 0:
        p.error(f"--encoder-layers {args.encoder_layers} must be >= 0")
    warmup_pairs = args.pairs if args.warmup_pairs is None else args.warmup_pairs
    if min(args.pairs, warmup_pairs) < 0 or (max(args.pairs, warmup_pairs) and (args.random_offset or args.marker or eval_chunks)):
        p.error(f"--pairs {args.pairs} / --warmup-pairs {args.warmup_pairs}: give N >= 1, without --random-offset, --marker or --eval-chunks")
    if args.query_before_chunk and not args.pairs:
        p.error("--query-before-chunk places key-value pairs: give --pairs N")
    for flag, n, chunks in [("--pairs", args.pairs, args.chunks)] + ([("--warmup-pairs", warmup_pairs, warmup[0])] if warmup else []):
        if args.query_before_chunk and n > chunks - 2:
            p.error(f"{flag} {n} with --query-before-chunk: one chunk each and two for the query do not fit in "
                    f"{chunks} chunks; raise the stage's chunks")
        elif not args.query_before_chunk and n > max_pairs(CHUNK_SIZE * chunks):
            p.error(f"{flag} {n}: {1 + KEY_LEN} tokens each do not fit in the first half of {chunks} chunks; raise the "
                    "stage's chunks")
    if args.smeared_memory:
        import drt_jax.model as model_module

        model_module.ChunkEncoder = smeared_encoder_class()
    base = ModelConfig.from_preset("tiny").replace(d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=128, decoder_layers=(1, 1),
                                                    encoder_layers=args.encoder_layers, chunk_size=CHUNK_SIZE,
                                                    window=args.window, top_k=args.top_k, gumbel_scale=args.gumbel_scale)
    T = args.chunks * base.chunk_size
    if args.grad_norms:
        norms = answer_grad_norms(base.replace(gca_residual=args.wiring.split(",")[0]), batch_size=args.batch, T=T,
                                  seed=int(args.seeds.split(",")[0]), random_offset=args.random_offset)
        for label, value in norms.items():
            print(f"{label:>24}: {value:.2e}")
        return 0
    results = []
    for wiring in args.wiring.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = base.replace(gca_residual=wiring)
            stages = [(cfg, T, args.steps)]
            if warmup:
                chunks, top_k, steps = warmup
                stages.insert(0, (cfg.replace(top_k=top_k), chunks * cfg.chunk_size, steps, warmup_pairs))
            curve, params = train(stages, batch_size=args.batch, lr=args.lr, seed=seed, log=args.log,
                                  gumbel=args.gumbel_scale > 0, random_offset=args.random_offset, marker=args.marker,
                                  noise=args.noise_filler, pairs=args.pairs, query_before=args.query_before_chunk)
            reached = next((s for s, v in curve if v < args.target), None)
            results.append({"wiring": wiring, "seed": seed, "curve": curve, "first_below_target": reached})
            probe = ""
            if args.pairs:
                results[-1]["probe"] = pairs_probe(cfg, params, T, args.pairs, batch_size=256, seed=seed,
                                                   noise=args.noise_filler, query_before=args.query_before_chunk)
                probe = "; fresh rows: " + ", ".join(f"{k} {v:.2f}" for k, v in results[-1]["probe"].items())
            print(f"{wiring:>8} seed {seed}: answer loss {curve[0][1]:.2f} (step {curve[0][0]}) -> {curve[-1][1]:.2f} "
                  f"(step {curve[-1][0]}); below {args.target} first at step {reached}{probe}", flush=True)
            if eval_chunks:
                sweep = length_sweep(cfg, params, eval_chunks, batch_size=64,
                                     seed=seed, random_offset=args.random_offset, marker=args.marker,
                                     noise=args.noise_filler)
                results[-1]["length_sweep"] = sweep
                for row in sweep:
                    print(f"{'':>8} {row['chunks']:>4} chunks: answer loss {row['answer_loss']:.2f}, "
                          f"w_needle {row['w_needle']:.2f}, recall {row['recall']:.2f}", flush=True)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "chance": float(np.log(26)), "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
