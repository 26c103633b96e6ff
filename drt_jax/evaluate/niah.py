"""NIAH sweep per (context length, needle depth): exact match of the whole greedy answer, with the
diagnostics that say why -- the teacher-forced loss of the answer tokens and, per retrieval group,
needle-chunk recall@k (are the chunks holding the needle's value among the top-k retrieved for the
chunk that generates the answer?) and the needle chunks' share of that retrieval's GCA weight. The
same are broken down by where the question ends within its chunk (the sample's offset,
drt_jax.tasks.niah), in the buckets of offset_buckets. Tasks with distractor needles (multi-key,
2-hop, the conversation's keyed question) add distractor recall and weight (the share of the
distractor values' chunks that the same retrieval fetched, and of its weight that they got) and how
many answers copied a distractor's value: a retrieval that matches the needles' format but not the key
fetches them all with like weights, one that tells the key weights the needle's chunk above them (so
a miss is the read-out's), and a read-out that finds a value but not the queried one answers one of
them. conversation_sweep measures the same per question of a two-question conversation, the second
asked after the model's own first answer."""

from __future__ import annotations

import dataclasses

import numpy as np

from drt_jax import chunking
from drt_jax.diagnostics import chunk_recall, chunk_weight, trailing_share
from drt_jax.evaluate.common import EvalError
from drt_jax.tasks.niah import ConversationTask, NiahTask, offset_bucket, offset_buckets, score_exact


def answer_diagnostics(engine, prompts, answers):
    """Prefills prompts [B, T] once, then decodes the answers [B, A] twice: greedily and teacher-forced.

    Returns (generated [B, A] int32, answer_loss [B] float (mean nats per answer token, teacher-forced),
    retrieved [G, B, K] int32: each group's retrieval read by the chunk of the prompt's last token,
    which generates the answer (-1 = empty slot), weights [G, B, K] float32: the GCA weights of those
    slots (a softmax over the filled ones: they sum to 1, or 0 where none is); G = 0 for models
    without retrieval).
    """
    return answer_turn(engine, engine.init_state(), prompts, answers)[:4]


def answer_turn(engine, state, prompts, answers, *, feed_answer: bool = False):
    """answer_diagnostics on `state`: a fresh state, or one holding earlier turns of a conversation (the
    engine aligns a later turn as it does the first). Returns (generated, answer_loss, retrieved, weights,
    state): the state after the greedy answer, with all A tokens fed where feed_answer (so that a next
    turn follows the model's own whole answer), else the first A - 1 (all greedy decoding needs)."""
    import jax
    import jax.numpy as jnp

    answers = np.asarray(answers, np.int32)
    B, A = answers.shape
    logits, state = engine.prefill(state, prompts)
    if engine.cfg.uses_retrieval:
        retrieved, weights = map(np.asarray, jax.device_get((state.dev.ret_idx, state.dev.ret_w)))
    else:
        retrieved, weights = np.zeros((0, B, 0), np.int32), np.zeros((0, B, 0), np.float32)
    # The steps donate their device state, so the greedy pass starts from a snapshot of the part that
    # the teacher-forced pass changes (none needed where it takes no step): _snapshot says why the chunk
    # memory is not in it.
    restore = _snapshot(state.dev) if A > 1 else (lambda after, dev=state.dev: dev)
    nll = np.zeros(B)
    forced, step_logits = state, logits
    for i in range(A):
        logp = jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1)
        nll -= np.asarray(jnp.take_along_axis(logp, jnp.asarray(answers[:, i : i + 1]), axis=-1))[:, 0]
        if i + 1 < A:
            step_logits, forced = engine.step(forced, answers[:, i])
    # The host memory goes on with the chunk memory: the forced pass may have grown both.
    state = dataclasses.replace(state, dev=restore(forced.dev), host=forced.host)
    del forced
    generated = []
    for i in range(A):
        nxt = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        generated.append(nxt)
        if i + 1 < A or feed_answer:
            logits, state = engine.step(state, nxt)
    return np.stack(generated, axis=1), nll / A, retrieved, weights, state


def _snapshot(dev):
    """A device copy of the state `dev` (memory.DeviceState) but for its chunk memory -> restore(after):
    the copy with the chunk memory of `after`, the state a teacher-forced pass from `dev` left.

    The chunk memory (mem_lmk, mem_k, mem_v) is most of the state (about 26 GB per sequence for drt-20m
    at 16M tokens) and needs no copy: a pass from `dev` writes only the rows of the chunks it closes,
    from dev's n_chunks on, which retrieval does not read until a chunk is closed, and a greedy pass
    from the same position closes the same chunks at the same steps, rewriting each of those rows
    before any retrieval reads it. (Offloaded, the rows live on the host and are rewritten alike.)"""
    import jax
    import jax.numpy as jnp

    copy = jax.tree.map(jnp.copy, dev.replace(mem_lmk=None, mem_k=None, mem_v=None))
    return lambda after: copy.replace(mem_lmk=after.mem_lmk, mem_k=after.mem_k, mem_v=after.mem_v)


def niah_sweep(cfg, params, tokenizer, haystack, *, task: str, lengths, depths, samples: int,
               offload: str | None = None, batch_size: int = 1, seed: int = 0, align: str = "random",
               progress=None) -> dict:
    """Runs the sweep -> JSON-ready {"accuracy", "answer_loss": {length: {depth: value}}, "needle_recall",
    "needle_weight": {"g<g>": {length: {depth: value}}}, "by_offset" (offset_breakdown), "records": [one
    per sample, with its offset and the alignment pads the engine put before it], ...}. align: the task's layout
    ("random", "chunk" or "pad"). Prompts are aligned as cfg.prompt_align says, and needle chunk ids
    count the pads. A batch holds samples of one (aligned) prompt length: unaligned prompts at random
    offsets batch less."""
    from drt_jax.inference import InferenceEngine

    t = NiahTask(task, tokenizer, haystack, cfg.chunk_size, seed=seed, align=align)
    aligning = _check_sweep(cfg, t, lengths, depths)

    span = trailing_span(cfg)

    def pads(n: int) -> int:  # pad ids the engine puts before a prompt of n tokens
        return chunking.prompt_padding(0, n, cfg.chunk_size) if aligning else 0

    records = []
    for length in lengths:
        max_len = length + 64 if cfg.arch == "full" else None
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
                gen, loss, retrieved, weights = answer_diagnostics(eng, prompts, np.stack([s.answer for s in batch]))
                for b, (i, s) in enumerate(zip(indices, batch, strict=True)):
                    rows[i] = {"length": length, "depth": depth, "offset": s.offset, "pads": pads(s.prompt_len),
                               "needles": list(s.needle_positions),
                               **_answer_record(s.answer, gen[b], loss[b], retrieved[:, b], weights[:, b],
                                                s.needle_chunks(cfg.chunk_size, pads(s.prompt_len)),
                                                s.distractors(cfg.chunk_size, pads(s.prompt_len)),
                                                span=span)}
                if progress is not None:
                    progress(len(batch))
            records.extend(rows[i] for i in sorted(rows))
    return {"task": task, "align": align, **_sweep_meta(cfg, lengths, depths, samples, offload),
            **_question_tables(records, lengths, depths, cfg), "records": records}


def trailing_span(cfg) -> int:
    """How many chunks after a needle's still read it through the lower layers' window (cfg.window
    slots, chunks of chunk_size + 1 slots): their landmarks can look like the needle's to the retriever."""
    return max(cfg.window // (cfg.chunk_size + 1) - 1, 0) if cfg.window else 0


def _answer_record(answer, generated, loss, retrieved, weights, needle_chunks, distractors=None, *,
                   span: int = 0) -> dict:
    """One answer's record: the true and generated tokens, exact match, teacher-forced loss, and per
    retrieval group (retrieved, weights [G, K]) the chunks fetched, the recall of needle_chunks among
    them and the weight that went to them ("needle_weight", chunk_weight). distractors: (their chunk ids,
    their values) as NiahSample.distractors gives them; where there are any, also "distractor_chunks",
    "distractor_recall" and "distractor_weight" per group and "answered_distractor" (the generated
    answer begins with a distractor's value). A chunk holding tokens of both a needle and a distractor
    counts in both weights. "trailing_slots" per group: the share of the filled slots spent on the `span`
    chunks right after a needle's or a distractor's (trailing_share; span: trailing_span)."""
    groups = range(len(retrieved))
    record = {"answer": answer.tolist(), "generated": generated.tolist(), "correct": score_exact(generated, answer),
              "answer_loss": float(loss), "needle_chunks": needle_chunks.tolist(),
              "retrieved": {f"g{g}": retrieved[g].tolist() for g in groups},
              "recall": {f"g{g}": chunk_recall(retrieved[g], needle_chunks) for g in groups},
              "needle_weight": {f"g{g}": chunk_weight(retrieved[g], weights[g], needle_chunks) for g in groups}}
    if distractors is not None and len(distractors[1]):
        chunks, values = distractors
        record.update(distractor_chunks=chunks.tolist(),
                      distractor_recall={f"g{g}": chunk_recall(retrieved[g], chunks) for g in groups},
                      distractor_weight={f"g{g}": chunk_weight(retrieved[g], weights[g], chunks) for g in groups},
                      answered_distractor=any(score_exact(generated[: len(v)], v) for v in values))
    needles = np.union1d(needle_chunks, record.get("distractor_chunks", []))
    record["trailing_slots"] = {f"g{g}": trailing_share(retrieved[g], needles, span) for g in groups}
    return record


def _check_sweep(cfg, task, lengths, depths) -> bool:
    """One-line errors for a sweep that cannot run; -> whether the engine aligns prompts (and turns)."""
    if not cfg.uses_retrieval and cfg.arch != "swa" and cfg.arch != "full":
        raise EvalError(f"unsupported arch {cfg.arch}")
    for length in lengths:
        task.check_length(length)
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise EvalError(f"depth {d} must be in [0, 1]")
    return cfg.uses_retrieval and cfg.prompt_align == "chunk"


def _sweep_meta(cfg, lengths, depths, samples, offload) -> dict:
    return {"prompt_align": cfg.prompt_align if cfg.uses_retrieval else None, "lengths": list(lengths),
            "depths": list(depths), "samples_per_cell": samples, "offload": offload, "chunk_size": cfg.chunk_size,
            "top_k": cfg.top_k if cfg.uses_retrieval else None,
            "offset_buckets": [label for label, _, _ in offset_buckets(cfg.chunk_size)]}


def _question_tables(records, lengths, depths, cfg) -> dict:
    """One question's tables from its records ({"length", "depth", "offset", "correct", "answer_loss",
    "recall", "needle_weight": {group: value}}): "accuracy", "answer_loss" {length: {depth: mean}},
    "needle_recall", "needle_weight" {group: {length: {depth: mean of the defined values}}}, "by_offset"
    (offset_breakdown), and the distractor tables where every record has distractors."""
    groups = [f"g{g}" for g in range(len(cfg.groups))]
    table = lambda value, mean=np.mean: _depth_table(records, lengths, depths, value, mean)
    per_group = lambda key: {g: table(lambda r, g=g: r[key][g], np.nanmean) for g in groups}
    out = {"accuracy": table(lambda r: r["correct"]), "answer_loss": table(lambda r: r["answer_loss"]),
           "needle_recall": per_group("recall"), "needle_weight": per_group("needle_weight"),
           "by_offset": offset_breakdown(records, lengths, cfg.chunk_size, groups)}
    if records and all("answered_distractor" in r for r in records):
        out["answered_distractor"] = table(lambda r: r["answered_distractor"])
        out["distractor_recall"] = per_group("distractor_recall")
        out["distractor_weight"] = per_group("distractor_weight")
    if records and all("trailing_slots" in r for r in records):
        out["trailing_slots"] = per_group("trailing_slots")
    return out


def _depth_table(records, lengths, depths, value, mean=np.mean) -> dict:
    """{length: {depth: mean of value(record) over the records of that cell}}."""
    return {str(L): {str(d): float(mean([value(r) for r in records if r["length"] == L and r["depth"] == d]))
                     for d in depths} for L in lengths}


QUESTIONS = ("passkey", "keyed value")  # the conversation's questions, in the order asked


def conversation_sweep(cfg, params, tokenizer, haystack, *, lengths, depths, samples: int,
                       offload: str | None = None, seed: int = 0, progress=None) -> dict:
    """The two-question conversation (drt_jax.tasks.niah.ConversationTask) per (length, depth), one
    sample at a time: prefill turn 1, generate answer 1 greedily and feed it back (a user's conversation
    continues from the model's own answer), prefill turn 2 on the same state, generate answer 2. The
    engine aligns each turn as cfg.prompt_align says (turn 2 mid-chunk). -> JSON-ready {"accuracy":
    {length: {depth: both answers exact}}, "questions": [per question: its niah_sweep tables ("accuracy",
    "answer_loss" (answer 2's teacher-forced after the model's own answer 1), "needle_recall" of the
    retrieval read when the answer is generated, "by_offset" by that question's offset)], "records":
    [one per sample: "pads" before each turn, "questions": [the per-answer fields of niah_sweep's
    records]], ...}. Needle chunk ids count the pads before turn 1 (every needle is in turn 1)."""
    from drt_jax.inference import InferenceEngine

    if cfg.arch == "full":
        raise EvalError("arch='full' prefills a fresh state only, so it cannot take turn 2; evaluate drt or swa")
    task = ConversationTask(tokenizer, haystack, cfg.chunk_size, seed=seed)
    aligning = _check_sweep(cfg, task, lengths, depths)
    records = []
    for length in lengths:
        eng = InferenceEngine(cfg, params, batch_size=1, offload=offload, max_chunks=length // cfg.chunk_size + 5)
        for depth in depths:
            for i in range(samples):
                s = task.sample(length, depth, i)
                questions = converse(eng, s, aligning)
                records.append({"length": length, "depth": depth, "index": i, "pads": list(s.pads(aligning)),
                                "needles": list(s.needle_positions), "questions": questions,
                                "both_correct": all(q["correct"] for q in questions)})
                if progress is not None:
                    progress(1)
    per_question = []
    for q, name in enumerate(QUESTIONS):
        rows = [{"length": r["length"], "depth": r["depth"], **r["questions"][q]} for r in records]
        per_question.append({"question": name, **_question_tables(rows, lengths, depths, cfg)})
    return {"task": ConversationTask.kind, "align": task.align, **_sweep_meta(cfg, lengths, depths, samples, offload),
            "accuracy": _depth_table(records, lengths, depths, lambda r: r["both_correct"]),
            "questions": per_question, "records": records}


def converse(engine, sample, aligning: bool) -> list[dict]:
    """Runs one conversation (batch 1) -> per question {"offset", "answer", "generated", "correct",
    "answer_loss", "needle_chunks" (in the engine's padded stream), "retrieved", "recall", "needle_weight"}.
    aligning: whether the engine pads each turn (ModelConfig.prompt_align="chunk")."""
    state = engine.init_state()
    pads = sample.pads(aligning)
    span = trailing_span(engine.cfg)
    out = []
    for q, (turn, answer) in enumerate(zip(sample.turns, sample.answers, strict=True)):
        gen, loss, retrieved, weights, state = answer_turn(engine, state, turn[None], answer[None], feed_answer=q == 0)
        out.append({"offset": sample.offsets[q],
                    **_answer_record(answer, gen[0], loss[0], retrieved[:, 0], weights[:, 0],
                                     sample.needle_chunks(q, pads[0]), sample.distractors(q, pads[0]),
                                     span=span)})
    return out


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
    """Accuracy, answer loss, needle recall and needle weight per offset bucket (offset_buckets(chunk_size)),
    for each length and over all of them ("all"): {"samples": {length: {bucket: n}}, "accuracy": {length:
    {bucket: value}}, "answer_loss": ..., "needle_recall": {group: {length: {bucket: value}}},
    "needle_weight": likewise, where every record has it (older results do not)}. A value is None where
    the bucket has no sample (or, for recall and weight, no sample with needle chunks)."""
    labels = [label for label, _, _ in offset_buckets(chunk_size)]
    cells: dict = {}
    for r in records:
        bucket = offset_bucket(r["offset"], chunk_size)
        for key in (str(r["length"]), "all"):
            cells.setdefault((key, bucket), []).append(r)
    out: dict = {"samples": {}, "accuracy": {}, "answer_loss": {}, "needle_recall": {g: {} for g in groups}}
    means = [("needle_recall", "recall")]
    if all("needle_weight" in r for r in records):
        out["needle_weight"] = {g: {} for g in groups}
        means.append(("needle_weight", "needle_weight"))
    for key in [str(L) for L in lengths] + ["all"]:
        rows = {b: cells.get((key, b), []) for b in labels}
        out["samples"][key] = {b: len(rows[b]) for b in labels}
        out["accuracy"][key] = {b: _mean([float(r["correct"]) for r in rows[b]]) for b in labels}
        out["answer_loss"][key] = {b: _mean([r["answer_loss"] for r in rows[b]]) for b in labels}
        for name, field in means:
            for g in groups:
                out[name][g][key] = {b: _mean([r[field][g] for r in rows[b]]) for b in labels}
    return out


def _mean(values) -> float | None:
    """Mean of the values that are not NaN; None where there are none."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else None


def summary_lines(result: dict) -> list[str]:
    """The sweep's tables (accuracy, answer loss, recall and weight per group), depth by length, then the
    same by offset bucket (rows with samples only; "all" when there are several lengths), as text lines. A
    conversation (conversation_sweep) gives them per question, then both answers' accuracy."""
    if result.get("questions"):  # a conversation: each question's tables, then both answers'
        lines = []
        for q, view in enumerate(result["questions"]):
            lines.append(f"question {q + 1} ({view['question']}):")
            lines += summary_lines({**result, **view, "questions": None})
        return lines + _depth_table_lines("both answers correct", result, result["accuracy"], "{:>8.3f}")
    tables = [("accuracy", result["accuracy"], "{:>8.3f}"), ("answer loss (nats/token)", result["answer_loss"], "{:>8.2f}")]
    tables += [(f"needle-chunk recall@{result['top_k']} {g}", t, "{:>8.2f}") for g, t in result["needle_recall"].items()]
    # Results written before the weights were recorded have no weight tables.
    tables += [(f"needle-chunk weight {g}", t, "{:>8.2f}") for g, t in result.get("needle_weight", {}).items()]
    if result.get("answered_distractor") is not None:
        tables.append(("answers that copied a distractor's value", result["answered_distractor"], "{:>8.3f}"))
        tables += [(f"distractor-chunk recall@{result['top_k']} {g}", t, "{:>8.2f}")
                   for g, t in result["distractor_recall"].items()]
        tables += [(f"distractor-chunk weight {g}", t, "{:>8.2f}") for g, t in result.get("distractor_weight", {}).items()]
    tables += [(f"slots on the chunks just after a needle {g}", t, "{:>8.2f}")
               for g, t in result.get("trailing_slots", {}).items()]
    lines = [line for title, table, fmt in tables for line in _depth_table_lines(title, result, table, fmt)]
    lengths = result["lengths"]
    by = result.get("by_offset")
    if by is None:  # results written before offsets were recorded
        return lines
    cols = [(f"{word} {g}", by[name][g]) for word, name in (("recall", "needle_recall"), ("weight", "needle_weight"))
            if name in by for g in by[name]]
    lines.append(f"by the question's offset in its chunk of {result['chunk_size']} tokens ({result.get('align')} layout):")
    lines.append(f"{'length':>8} {'offset':>8} {'n':>5} {'accuracy':>8} {'loss':>8} "
                 + " ".join(f"{title:>9}" for title, _ in cols))
    keys = [str(L) for L in lengths] + (["all"] if len(lengths) > 1 else [])
    num = lambda v, fmt: fmt.format(v) if v is not None else f"{'-':>{len(fmt.format(0.0))}}"
    for key in keys:
        for b in result["offset_buckets"]:
            n = by["samples"][key][b]
            if n:
                lines.append(f"{key:>8} {b:>8} {n:>5} {num(by['accuracy'][key][b], '{:>8.3f}')} "
                             f"{num(by['answer_loss'][key][b], '{:>8.2f}')} "
                             + " ".join(num(col[key][b], "{:>9.2f}") for _, col in cols))
    return lines


def _depth_table_lines(title: str, result: dict, table: dict, fmt: str) -> list[str]:
    """A {length: {depth: value}} table as text: a header line, then a line per depth."""
    lengths, depths = result["lengths"], result["depths"]
    lines = [f"{title}: depth \\ length " + " ".join(f"{L:>8d}" for L in lengths)]
    return lines + [f"{d:>14g} " + " ".join(fmt.format(table[str(L)][str(d)]) for L in lengths) for d in depths]


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
    what = "both answers exact" if result.get("questions") else "exact-match accuracy"  # see conversation_sweep
    ax.set_title(f"NIAH {result['task']}: {what}")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
