"""A direct training loop over NIAH-single batches: can a model copy the passkey at all?

    python experiments/copy_probe.py --steps 400 --length 256                      # needle beyond the window
    python experiments/copy_probe.py --steps 400 --length 256 --set window=300     # needle inside the window

No trainer, no mixture: fresh NIAH samples each step (uniform depth), loss = LM loss over the sample +
answer_weight x the answer loss, Adam. Prints the LM and answer loss (chance for alphanumeric passkeys:
ln 62 = 4.13). With `--set window=...` covering the sequence, the needle sits in plain attention and
the probe measures copying without retrieval.
"""

from __future__ import annotations

import argparse
import ast
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from drt_jax.config import ModelConfig
from drt_jax.data import ByteTokenizer
from drt_jax.losses import next_token_loss
from drt_jax.model import DRT
from drt_jax.tasks.niah import NiahTask, default_haystack


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", nargs="*", default=[], help="ModelConfig overrides, e.g. window=300")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--answer-weight", type=float, default=1.0)
    p.add_argument("--gumbel", action="store_true", help="Gumbel-top-k retrieval noise, as in training")
    args = p.parse_args(argv)

    overrides = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    tok = ByteTokenizer()
    task = NiahTask("single", tok, default_haystack(tok, 1 << 20), cfg.chunk_size, seed=0, align="chunk")
    model = DRT(cfg)
    T, B = args.length, args.batch
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))["params"]
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)
    prompt_len = task.sample(T, 0.5, 0).prompt_len  # the same for every sample of this length
    A = task.answer_len

    def losses(p, tokens, key):
        logits = model.apply({"params": p}, tokens, deterministic=not args.gumbel,
                             rngs={"gumbel": key} if args.gumbel else None)
        lm = next_token_loss(logits, tokens, cfg.pad_id)[0]
        logp = jax.nn.log_softmax(logits[:, prompt_len - 1 : prompt_len - 1 + A].astype(jnp.float32))
        answer = -jnp.mean(jnp.take_along_axis(logp, tokens[:, prompt_len : prompt_len + A, None], -1))
        return lm + args.answer_weight * answer, (lm, answer)

    @jax.jit
    def step(p, s, tokens, key):
        (_, aux), g = jax.value_and_grad(lambda p: losses(p, tokens, key), has_aux=True)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, aux

    t0 = time.time()
    for i in range(args.steps):
        rng = np.random.default_rng([1, i])
        tokens = np.stack([task.sample(T, float(rng.random()), i * B + b).tokens for b in range(B)])
        params, opt_state, (lm, answer) = step(params, opt_state, jnp.asarray(tokens), jax.random.PRNGKey(i))
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i}: lm {float(lm):.3f} answer {float(answer):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
