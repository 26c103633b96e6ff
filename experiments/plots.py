"""Plots for docs/results.md: training curves from metrics.jsonl and NIAH curves from eval.py's JSON.

    python experiments/plots.py curves RUN_DIR/metrics.jsonl --out docs/img/curves.png [--title T]
    python experiments/plots.py niah EVAL/niah_single.json [MORE.json ...] --out docs/img/niah.png [--labels A,B]
    python experiments/plots.py merge EVAL/niah_4k_1m.json EVAL/niah_16m.json --out EVAL/niah_4k_16m.json
    python experiments/plots.py ppl SWA/eval/ppl.json DRT/eval/ppl.json --labels swa,DRT --out docs/img/ppl.png
    python experiments/plots.py bench [--results bench/results] [--out-dir docs/img]

curves: corpus loss, answer loss (with the chance level of the passkey alphabet) and needle-chunk
recall per retrieval group against the step, and each task's own where a mixture logged them.
niah: accuracy, answer loss and recall against the context length, one line per depth (and per file,
e.g. DRT and its sliding-window baseline).
merge: one eval.py niah result from several eval.py runs over different lengths (one model, task and depths).
ppl: eval.py ppl results, perplexity against the context length, and each file's perplexity relative to the
first file's (the baseline) at the lengths they share.
bench: the benchmark JSON of bench/results as docs/results.md's plots: GCA kernel times by shape
(bench-gca-kernels.png), training tokens/s and memory by length (bench-train-throughput.png) and decode
time and device state by context (bench-inference.png).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_kind(metrics_path: str) -> tuple[str | None, list | None]:
    """The model's arch and the data mixture from the run's config.json beside metrics.jsonl (None: unknown)."""
    path = pathlib.Path(metrics_path).with_name("config.json")
    try:
        config = json.loads(path.read_text())
        return config["model"]["arch"], list(config["data"]["mixture"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def training_curves(metrics_path: str, out: str, title: str = "", chance: float | None = None) -> None:
    rows = [json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/loss" in r]
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [r["step"] for r in rows]
    for key, label in (("train/corpus_loss", "corpus tokens"), ("train/loss", "objective (weighted)")):
        pts = [(s, r[key]) for s, r in zip(steps, rows, strict=True) if key in r]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), label=label)
    axes[0].set_title("loss (nats/token)")
    pts_answer = [(s, r["train/answer_loss"]) for s, r in zip(steps, rows, strict=True) if "train/answer_loss" in r]
    if pts_answer:
        axes[1].plot(*zip(*pts_answer, strict=True), label="answer tokens")
    for key in sorted({k for r in rows for k in r if k.startswith("train/answer_loss/")}):  # per task of a mixture
        pts = [(s, r[key]) for s, r in zip(steps, rows, strict=True) if key in r]
        axes[1].plot(*zip(*pts, strict=True), label=key.split("/", 2)[2], lw=0.8)
    if chance:
        axes[1].axhline(chance, color="gray", ls="--", label=f"chance {chance:.2f}")
    axes[1].set_title("answer loss (nats/token)")
    recall_keys = sorted({k for r in rows for k in r if k.startswith("train/recall_")})
    for key in recall_keys:
        pts = [(s, r[key]) for s, r in zip(steps, rows, strict=True) if key in r]
        axes[2].plot(*zip(*pts, strict=True), label=key.split("/", 1)[1], lw=0.8 if key.count("/") > 1 else None)
    arch, mixture = _run_kind(metrics_path)
    if not pts_answer and mixture == []:
        axes[1].text(0.5, 0.5, "no task examples in this run", ha="center", va="center", transform=axes[1].transAxes)
    if not recall_keys:
        if arch not in (None, "drt"):
            why = "no retrieval in this model"
        elif mixture == []:
            why = "no task examples in this run"
        else:
            why = "no needle recall logged"
        axes[2].text(0.5, 0.5, why, ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_title("needle-chunk recall@k (training batches)")
    axes[2].set_ylim(-0.02, 1.04)  # recall of exactly 1 stays visible
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def niah_curves(paths: list[str], out: str, labels: list[str] | None = None) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for i, path in enumerate(paths):
        r = json.loads(pathlib.Path(path).read_text())
        name = labels[i] if labels else r.get("model", pathlib.Path(path).stem)
        lengths = r["lengths"]
        for d in r["depths"]:
            axes[0].plot(lengths, [r["accuracy"][str(L)][str(d)] for L in lengths], marker="o", label=f"{name} depth {d:g}")
            axes[1].plot(lengths, [r["answer_loss"][str(L)][str(d)] for L in lengths], marker="o", label=f"{name} depth {d:g}")
            for g, table in r.get("needle_recall", {}).items():
                axes[2].plot(lengths, [table[str(L)][str(d)] for L in lengths], marker="o", label=f"{name} {g} depth {d:g}")
    for ax, title in zip(axes, ("exact-match accuracy", "answer loss (nats/token)", "needle-chunk recall@k"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=6)
    axes[0].set_ylim(-0.02, 1.02)
    axes[2].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def ppl_by_length(path: str) -> tuple[str, dict[int, float]]:
    """eval.py ppl's JSON -> (the model's name, {length: perplexity})."""
    r = json.loads(pathlib.Path(path).read_text())
    if r.get("command") != "ppl" or not r.get("results"):
        raise ValueError(f"{path} is not an eval.py ppl result (no 'results'); pass the JSON that eval.py ppl --out wrote")
    return r.get("model", pathlib.Path(path).stem), {int(x["length"]): float(x["ppl"]) for x in r["results"]}


def ppl_curves(paths: list[str], out: str, labels: list[str] | None = None) -> None:
    """Left: perplexity against length per file. Right: each file's perplexity over the first file's."""
    models, tables = zip(*(ppl_by_length(path) for path in paths), strict=True)
    names = labels or list(models)
    base = tables[0]
    shared = sorted(set(base).intersection(*tables[1:]))
    if len(paths) > 1 and not shared:
        raise ValueError(f"the files share no context length ({paths[0]}: {sorted(base)}); evaluate them at the same lengths")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, (name, table) in enumerate(zip(names, tables, strict=True)):
        lengths = sorted(table)
        line = axes[0].plot(lengths, [table[L] for L in lengths], marker="o", label=name)[0]
        if i:
            axes[1].plot(shared, [table[L] / base[L] for L in shared], marker="o", color=line.get_color(),
                         label=f"{name} / {names[0]}")
    axes[0].set_title("held-out perplexity")
    axes[1].set_title("perplexity / baseline's (below 1: better)")
    axes[1].axhline(1.0, color="gray", ls="--", lw=0.8, label=names[0])
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _save(fig, out: pathlib.Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def train_throughput_table(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """(model, tokens per sequence) -> the newest measured case. A run labelled superseded counts only
    for models without retrieval (its DRT rows used the jnp reference GCA)."""
    table = {}
    for run in runs:
        old = "superseded" in run.get("label", "")
        for case in run["cases"]:
            if case.get("status") == "ok" and not (old and case["model"].startswith("drt")):
                table[(case["model"], int(case["seq_len"]))] = case
    return table


def bench_plots(results: str, out_dir: str) -> list[pathlib.Path]:
    """bench/results/{gca_kernels,train_throughput,inference}.json -> three PNGs in out_dir."""
    plt = _plt()
    results, out_dir = pathlib.Path(results), pathlib.Path(out_dir)
    written = []

    gca = json.loads((results / "gca_kernels.json").read_text())
    shapes = sorted({(t["B"], t["tokens"]) for t in gca["timings"]})
    impls = list(dict.fromkeys(t["impl"] for t in gca["timings"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        by_shape = {(t["B"], t["tokens"]): t for t in gca["timings"] if t["impl"] == impl}
        for ax, key in zip(axes, ("fwd", "fwdbwd"), strict=True):
            xs = [j + i * width for j, s in enumerate(shapes) if s in by_shape]
            ax.bar(xs, [by_shape[s][key]["ms"] for s in shapes if s in by_shape], width, label=impl)
    for ax, title in zip(axes, ("GCA forward (ms)", "GCA forward + backward (ms)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"B={b}, {n // 1024}K" for b, n in shapes])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{gca.get('device', '')}, bf16, K=8, H=12, D=64", fontsize=9)
    _save(fig, out_dir / "bench-gca-kernels.png")
    plt.close(fig)
    written.append(out_dir / "bench-gca-kernels.png")

    train = json.loads((results / "train_throughput.json").read_text())
    table = train_throughput_table(train["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for model in sorted({m for m, _ in table}):
        lengths = sorted(L for m, L in table if m == model)
        cases = [table[(model, L)] for L in lengths]
        axes[0].plot(lengths, [c["tokens_per_s"] / 1e3 for c in cases], marker="o", label=model)
        axes[1].plot(lengths, [c["compiled_bytes_estimate"] / 2**30 for c in cases], marker="o", label=model)
    for ax, title in zip(axes, ("training tokens/s (thousands), batch 1", "step memory (GB as in the table: GiB)"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(train["runs"][-1].get("device", "").removeprefix("gpu:"), fontsize=9)
    _save(fig, out_dir / "bench-train-throughput.png")
    plt.close(fig)
    written.append(out_dir / "bench-train-throughput.png")

    inf = json.loads((results / "inference.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for key in dict.fromkeys((r["model"], r["memory"]) for r in inf["decode"]):
        rows = sorted((r for r in inf["decode"] if (r["model"], r["memory"]) == key), key=lambda r: r["context"])
        label = f"{key[0]}, {key[1]} memory" if key[0].startswith("drt") else f"{key[0]}, KV cache"
        contexts = [r["context"] + 1 for r in rows]
        axes[0].plot(contexts, [r["ms_per_token"] for r in rows], marker="o", label=label)
        axes[1].plot(contexts, [r["state_device_bytes_at_context"] / 2**20 for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("decode ms/token, batch 1", "state on the device at that context (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(inf.get("device", ""), fontsize=9)
    _save(fig, out_dir / "bench-inference.png")
    plt.close(fig)
    written.append(out_dir / "bench-inference.png")
    return written


def merge_niah(paths: list[str]) -> dict:
    """eval.py niah results of one checkpoint over disjoint lengths -> one result, lengths sorted."""
    parts = [json.loads(pathlib.Path(path).read_text()) for path in paths]
    first = parts[0]
    for path, r in zip(paths, parts, strict=True):
        if r.get("task") == "conversation":
            raise ValueError(f"{path} is an eval.py niah --task conversation result, which merge does not join; "
                             "evaluate all its lengths in one eval.py call")
        for key in ("checkpoint", "task", "depths", "top_k", "align"):
            if r.get(key) != first.get(key):
                raise ValueError(f"{path}: {key} is {r.get(key)!r}, not {first.get(key)!r} as in {paths[0]}; merge one model's runs")
    lengths = [L for r in parts for L in r["lengths"]]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths {lengths} repeat across the files; merge runs over different lengths")
    merged = {**first, "lengths": sorted(lengths), "records": [x for r in parts for x in r["records"]],
              "seconds": round(sum(r.get("seconds", 0.0) for r in parts), 1), "merged_from": list(paths)}
    merged["samples_per_cell"] = min(r["samples_per_cell"] for r in parts)
    # Distractor tables (multi-key, 2-hop) and weight tables join only where every part has them (older
    # results do not).
    distractors = all("answered_distractor" in r for r in parts)
    for key in ("accuracy", "answer_loss") + (("answered_distractor",) if distractors else ()):
        merged[key] = {k: v for r in parts for k, v in r[key].items()}
    if not distractors:
        merged.pop("answered_distractor", None)
    for key in ("needle_recall", "needle_weight", "distractor_recall", "distractor_weight", "trailing_slots"):
        if all(key in r for r in parts):
            merged[key] = {g: {k: v for r in parts for k, v in r[key][g].items()} for g in first[key]}
        else:
            merged.pop(key, None)
    if "by_offset" in first:  # "all" spans every part's lengths, so it is recomputed from the records
        from drt_jax.evaluate.niah import offset_breakdown

        merged["by_offset"] = offset_breakdown(merged["records"], merged["lengths"], first["chunk_size"],
                                               list(first["needle_recall"]))
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("curves")
    c.add_argument("metrics")
    c.add_argument("--out", required=True)
    c.add_argument("--title", default="")
    c.add_argument("--alphabet-size", type=int, default=0, help="passkey alphabet size: draws chance = ln(size)")
    n = sub.add_parser("niah")
    n.add_argument("results", nargs="+")
    n.add_argument("--out", required=True)
    n.add_argument("--labels", default="", help="comma-separated legend names, one per file (default: the model's name)")
    m = sub.add_parser("merge")
    m.add_argument("results", nargs="+")
    m.add_argument("--out", required=True)
    q = sub.add_parser("ppl")
    q.add_argument("results", nargs="+", help="eval.py ppl JSON files, the baseline first")
    q.add_argument("--out", required=True)
    q.add_argument("--labels", default="", help="comma-separated legend names, one per file (default: the model's name)")
    b = sub.add_parser("bench")
    b.add_argument("--results", default=str(pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"))
    b.add_argument("--out-dir", default="docs/img")
    args = p.parse_args(argv)
    if args.kind == "bench":
        for path in bench_plots(args.results, args.out_dir):
            print(f"wrote {path}")
        return 0
    labels = [x.strip() for x in args.labels.split(",")] if getattr(args, "labels", "") else None
    if labels and len(labels) != len(args.results):
        p.error(f"--labels names {len(labels)} files but {len(args.results)} were given")
    if args.kind == "merge":
        try:
            merged = merge_niah(args.results)
        except (ValueError, KeyError, OSError) as err:
            p.error(str(err))
        pathlib.Path(args.out).write_text(json.dumps(merged, indent=1))
    elif args.kind == "ppl":
        try:
            ppl_curves(args.results, args.out, labels)
        except (ValueError, KeyError, OSError) as err:
            p.error(str(err))
    elif args.kind == "curves":
        training_curves(args.metrics, args.out, args.title, math.log(args.alphabet_size) if args.alphabet_size else None)
    else:
        niah_curves(args.results, args.out, labels)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
