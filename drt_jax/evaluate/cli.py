"""The eval.py command line: ppl, niah, generate, retrieval. Bad inputs end with one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description="Evaluate a DRT checkpoint.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--checkpoint", required=True,
                        help="run folder written by train.py, or random:PRESET[:SEED] (random weights, smoke tests)")
        sp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        sp.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
        sp.add_argument("--top-k", type=int, default=None,
                        help="retrieve this many chunks instead of the checkpoint's top_k (it holds no parameters)")
        sp.add_argument("--prompt-align", choices=["chunk", "none"], default=None,
                        help="chunk: left-pad each prompt so it ends on a chunk's first slot (the layout NIAH is "
                             "trained on); none: feed it as given (default: the checkpoint's model.prompt_align)")
        sp.add_argument("--out", default=None, help="JSON results file (default: eval_results/<command>.json)")
        sp.add_argument("--no-progress", action="store_true")

    def text_source(sp, what: str):
        sp.add_argument("--data", default=None, help=f"{what}; default: the run's own corpus (`default` for random:PRESET)")
        sp.add_argument("--split", choices=["all", "train", "val"], default=None,
                        help="val: the run's held-out split (the default for a run folder); train: its training split; "
                             "all: the corpus from its start (the default for random:PRESET)")

    sp = sub.add_parser("ppl", help="perplexity by context length (sliding windows)")
    common(sp)
    text_source(sp, "text/jsonl/parquet file or folder, or a built-in corpus (default, python-all)")
    sp.add_argument("--lengths", default="2K")
    sp.add_argument("--stride", type=int, default=-1, help="window stride in tokens (<=0: non-overlapping)")
    sp.add_argument("--max-windows", type=int, default=8)

    sp = sub.add_parser("niah", help="needle-in-a-haystack accuracy per length and depth")
    common(sp)
    sp.add_argument("--task", choices=["single", "multi", "2hop", "conversation"], default="single",
                    help="conversation: a passkey question, then, after the model's own answer, a keyed one "
                         "(both at random offsets, one sample at a time)")
    sp.add_argument("--lengths", default="4K")
    sp.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    sp.add_argument("--samples", type=int, default=10)
    sp.add_argument("--align", choices=["random", "chunk", "pad"], default="random",
                    help="where the question ends within its chunk: random (a uniform offset per sample, as a "
                         "user's prompt ends), chunk (on the chunk grid, the authors' layout and that of "
                         "docs/results.md before issue 25) or pad (random, then padded as the fine-tuning data is)")
    sp.add_argument("--batch-size", type=int, default=1,
                    help="samples per prefill; a batch holds prompts of one length once aligned (all of them unless "
                         "--prompt-align none, where only --align chunk gives equal lengths)")
    sp.add_argument("--offload", choices=["none", "host"], default="none")
    text_source(sp, "haystack corpus (file/folder, or default / python-all)")
    sp.add_argument("--plot", default=None, help="heatmap PNG (default: next to the JSON)")
    sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("generate", help="generate a continuation of a prompt")
    common(sp)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--offload", choices=["none", "host"], default="none")

    sp = sub.add_parser("retrieval", help="show the chunks each chunk retrieved, with a heatmap")
    common(sp)
    sp.add_argument("--text", required=True, help="a text file")
    sp.add_argument("--max-tokens", type=int, default=4096)
    sp.add_argument("--plot", default=None)
    return p


def _out(args, default_name: str) -> str:
    return args.out or os.path.join("eval_results", default_name)


def _resolve_text(args) -> None:
    """Fills in --data and --split where they were left out: a run folder is measured on the held-out
    split of its own corpus, since the rest of that corpus is text the model trained on."""
    run_folder = not args.checkpoint.startswith("random:")
    if args.data is None or args.split is None:
        corpus = "default"
        if run_folder:
            from drt_jax.train.checkpoints import read_run_config

            corpus = read_run_config(args.checkpoint).data.corpus
        args.data = corpus if args.data is None else args.data
        args.split = ("val" if run_folder else "all") if args.split is None else args.split


def _tokens(args, tok, max_tokens: int):
    from drt_jax.evaluate.common import read_split_tokens, read_tokens

    if args.split == "all":
        return read_tokens(args.data, tok, max_tokens)
    return read_split_tokens(args.data, tok, max_tokens, args.split, args.checkpoint)


def _plot_path(args, out: str) -> str:
    """--plot, or the results path with .png; its folder is created (the JSON is written only at the end)."""
    plot = args.plot or os.path.splitext(out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    return plot


def run(args) -> dict:
    from drt_jax.evaluate.common import (
        EvalError,
        load_model,
        parse_floats,
        parse_lengths,
        write_json,
    )

    show = not args.no_progress and sys.stderr.isatty()
    # Validate cheap arguments before loading anything.
    if args.command in ("ppl", "niah"):
        lengths = parse_lengths(args.lengths)
    if args.command == "niah":
        depths = parse_floats(args.depths, "depths")
        if args.samples < 1:
            raise EvalError(f"--samples {args.samples} must be >= 1")
        if args.task == "conversation" and (args.align != "random" or args.batch_size != 1):
            raise EvalError("--task conversation runs one sample at a time at random offsets: leave out --align "
                            "and --batch-size")
    if args.command == "generate" and not args.prompt:
        raise EvalError("empty prompt: give --prompt some text")
    if args.command == "retrieval" and not os.path.isfile(args.text):
        raise EvalError(f"text file {args.text} does not exist")

    if args.top_k is not None and args.top_k < 1:
        raise EvalError(f"--top-k {args.top_k} must be >= 1")
    cfg, params, tok = load_model(args.checkpoint, args.step, dtype=args.dtype, top_k=args.top_k,
                                  prompt_align=args.prompt_align)
    if args.command in ("ppl", "niah"):
        _resolve_text(args)
    started = time.time()
    meta = {"command": args.command, "checkpoint": args.checkpoint, "model": cfg.name, "top_k": cfg.top_k,
            "prompt_align": cfg.prompt_align}

    if args.command == "ppl":
        from drt_jax.evaluate.common import progress_bar
        from drt_jax.evaluate.perplexity import perplexity

        tokens = _tokens(args, tok, max(lengths) * (args.max_windows + 1) + 1)
        print(f"text: {args.data}, {args.split} split")
        results = []
        for L in lengths:
            with progress_bar(args.max_windows, f"ppl {L}", show) as bar:
                r = perplexity(cfg, params, tokens, L, args.stride, max_windows=args.max_windows, progress=bar.update)
            results.append(r)
            print(f"length {L:>8d}  windows {r['windows']:>4d}  tokens {r['tokens_scored']:>9d}  "
                  f"ppl {r['ppl']:.4f}  (window-mean {r['ppl_window_mean']:.4f})")
        payload = {**meta, "data": args.data, "split": args.split, "results": results}
    elif args.command == "niah":
        from drt_jax.evaluate.common import progress_bar
        from drt_jax.evaluate.niah import conversation_sweep, niah_sweep, plot_heatmap, summary_lines

        hay = _tokens(args, tok, 1 << 20)
        print(f"haystacks: {args.data}, {args.split} split")
        total = len(lengths) * len(depths) * args.samples
        common = dict(lengths=lengths, depths=depths, samples=args.samples, seed=args.seed,
                      offload=None if args.offload == "none" else "host")
        with progress_bar(total, f"niah {args.task}", show) as bar:
            if args.task == "conversation":
                r = conversation_sweep(cfg, params, tok, hay, **common, progress=bar.update)
            else:
                r = niah_sweep(cfg, params, tok, hay, task=args.task, **common, batch_size=args.batch_size,
                               align=args.align, progress=bar.update)
        print("\n".join(summary_lines(r)))
        payload = {**meta, "data": args.data, "split": args.split, **r}
        out = _out(args, f"niah_{args.task}.json")
        plot = _plot_path(args, out)
        plot_heatmap(r, plot)
        payload["plot"] = plot
        print(f"heatmap: {plot}")
    elif args.command == "generate":
        from drt_jax.inference import InferenceEngine, generate

        ids = tok.encode(args.prompt)
        if not ids:
            raise EvalError("empty prompt: it encodes to no tokens")
        eng = InferenceEngine(cfg, params, offload=None if args.offload == "none" else "host",
                              max_len=len(ids) + args.max_new_tokens + 1 if cfg.arch == "full" else None)
        gen, _ = generate(eng, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, eos_id=tok.eos_id)
        ids_out = [int(x) for x in gen[0]]
        if tok.eos_id in ids_out:
            ids_out = ids_out[: ids_out.index(tok.eos_id)]
        text = tok.decode(ids_out)
        print(args.prompt + text)
        payload = {**meta, "prompt": args.prompt, "completion": text, "tokens": ids_out}
    else:
        import numpy as np

        from drt_jax.evaluate.retrieval import inspect_retrieval, plot_retrieval

        with open(args.text, encoding="utf-8", errors="replace") as f:
            ids = tok.encode(f.read())[: args.max_tokens]
        r = inspect_retrieval(cfg, params, np.asarray(ids, np.int32), tok)
        for row in r["groups"][0]["chunks"]:
            got = ", ".join(f"#{x['chunk']} ({x['weight']:.2f}) {x['text'][:30]!r}" for x in row["retrieved"])
            print(f"chunk {row['chunk']:>4d} {row['text'][:30]!r} <- {got or '-'}")
        out = _out(args, "retrieval.json")
        plot = _plot_path(args, out)
        plot_retrieval(r, plot)
        print(f"heatmap: {plot}")
        payload = {**meta, **r, "plot": plot}
    payload["seconds"] = round(time.time() - started, 2)
    out = _out(args, f"{args.command}.json" if args.command != "niah" else f"niah_{args.task}.json")
    write_json(out, payload)
    print(f"results: {out}")
    return payload


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, ImportError) as err:  # our errors are ValueError subclasses, one line each
        if args.debug:
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"eval.py {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0
