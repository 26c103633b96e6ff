"""Needle-in-a-haystack tasks (spec 7.2, 7.3): single passkey, multi-key, 2-hop with noise.

One generator serves evaluation (prompt + answer, scored by exact match of the whole greedily generated
answer) and fine-tuning ({"tokens", "mask"} int32 [seq_len] for the trainer's task mixture).

Layout of a sample of context length T with model chunk size S (T is rounded down to whole chunks,
Tc = (T // S) * S). The question's end is placed by its offset o in [0, S): the index of the question's
last token within its chunk (the number of tokens of that chunk before it). The question's chunk is the
last whole one, so the last token sits at Tc - S + o; where the answer would then run past T, the
question moves one chunk earlier (Tc - 2S + o), so that every example holds its whole answer. The
answer follows at that index + 1 ..; in fine-tuning examples the rest is padding, excluded from the
loss (mask 0); everything before is a loss target, as in the authors' fine-tuning (spec 7.4).
  align="random" (the default): o is drawn uniformly in [0, S) per sample, from the sample's seed,
    because a user's prompt ends wherever it ends (issue 25: a model trained only on o = 0 answers only
    at o = 0).
  align="chunk": o = 0, the authors' layout (spec 7.2): the question's last token is the first slot of
    the last chunk, so the rest of the question ends the penultimate chunk, whose landmark makes the
    retrieval that the last chunk (where the answer is generated) reads. The results of docs/results.md
    before issue 25 use this layout; its samples are those of the code before the option (wherever the
    whole answer fitted there).
  align="pad": the layout the inference engine makes of a random-offset prompt (ModelConfig.prompt_align,
    chunking.prompt_padding), for fine-tuning: o is drawn as for "random", then the sample is the
    aligned one with its first (S - o) % S tokens (the `lead`) pad ids, so that the prompt without its
    lead ends at offset o and the engine, given that prompt, re-adds exactly that lead. The lead's
    tokens are not loss targets.
o = S - 1 ends the question on its chunk's last slot, so the answer opens the next chunk.

Formats (text pieces are encoded separately and concatenated, as the authors do). The question ends
with the very tokens that precede the value in its needle, so that the value is what follows the
question's end in the needle (see "Format" below):
  single: needle "|The passkey is:" P "|";                  question "|What is the passkey? The passkey is:" -> P
  multi:  6 needles "|One of the special magic numbers for " key " is " value "|" (5 distractors);
          question "|The special magic number for " key0 " is " -> value0
  2hop:   needles "|DEF " a "->" b "|" for chains v0->v1->v2 and a distractor chain v3->v4->v5,
          question "|The path from " v0 "->" -> v1 "->" v2
Variables are `answer_len` random tokens of an alphabet: "tokens" (every non-special id below 50256, the
authors' choice for GPT-2 BPE), "alnum" (the encodings of 0-9, A-Z, a-z), "digits", or "auto" (the
default): "alnum" for byte-level tokenizers, "tokens" otherwise. Uniform bytes make a bad passkey: half
of them (128-255) never occur in text, so their embeddings (tied with the output layer) stay untrained
and no copy mechanism can emit them; models trained on them do not learn NIAH at all (the first H100
runs: answer loss at chance, ln 256, even with the needle inside the attention window).

Format: the authors' question ends "... The passkey is" while the needle reads "The passkey is:" P, so
the token after the question's last token in the needle is ":", not the passkey. A model that finds
the needle and continues it (what attention over a retrieved chunk naturally learns) answers ":" -- the
failure seen in the first H100 runs (greedy answers ":" + a repeated byte). The question therefore
repeats the needle's text up to the value.

Conversation (ConversationTask, issue 25): two questions on one haystack, holding the single passkey
needle and the multi task's keyed needles; turn 1 = haystack + the passkey question -> P, then, after that
answer, turn 2 = a few haystack tokens + the keyed question -> its value. Both questions end at random
offsets; fine-tuning examples are the token stream the inference engine builds for the two turns.

Every sample records `key_positions`: the token indices of the needle values the answer is copied from
(single: the passkey; multi: the queried value; 2hop: v1 and v2), whose chunks a retrieval must fetch,
its `distractor_positions`: per other needle, the tokens at the value's place in it (multi: the other
keys' values; 2hop: v4 and v5 of the distractor chain), what a read-out that ignores the key copies,
and its `offset`. offset_buckets groups offsets for reports (eval.py niah). Depth in [0, 1] places the queried needle (2hop: the first hop) between the start of the haystack and
2 chunks before the question; the other needles go to uniformly random positions in that range.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import numpy as np

from drt_jax.chunking import prompt_padding

KINDS = ("single", "multi", "2hop")
ALIGNS = ("random", "chunk", "pad")  # where the question ends within its chunk; see the module docstring
# Tags the stream the offset is drawn from, apart from the sample's other draws, so that the aligned
# layout keeps every sample of the code before the option.
_OFFSET_STREAM = 1


class TaskError(ValueError):
    """A task request that cannot be built (e.g. a context too short for the needles)."""


@dataclasses.dataclass(frozen=True)
class NiahSample:
    tokens: np.ndarray  # int32 [T]: haystack, needles, question, answer, padding
    prompt_len: int  # the model is given tokens[:prompt_len] and must generate the answer
    answer: np.ndarray  # int32 [A] = tokens[prompt_len : prompt_len + A]
    needle_positions: tuple[int, ...]
    depth: float
    key_positions: tuple[int, ...] = ()  # token indices of the needle values the answer copies
    distractor_positions: tuple[tuple[int, ...], ...] = ()  # per other needle: its value's token indices
    offset: int = 0  # (prompt_len - lead - 1) % S: the question's last token's index within its chunk
    lead: int = 0  # pad ids before the haystack (align="pad"): the engine's prompt alignment

    def needle_chunks(self, chunk_size: int, pads: int = 0) -> np.ndarray:
        """Sorted chunk ids holding the key tokens: what the answer's retrieval must fetch. pads: tokens
        put before the prompt (the engine's prompt alignment), which shift every chunk id."""
        return chunks_of(self.key_positions, chunk_size, pads)

    def distractors(self, chunk_size: int, pads: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """(sorted chunk ids holding the distractor values, each distractor's value tokens)."""
        return distractors_of(self.tokens, self.distractor_positions, chunk_size, pads)

    def example(self, pad_id: int) -> dict[str, np.ndarray]:
        """Fine-tuning example, int32 [T] each: "tokens"; "mask" (LM loss on every token up to the end
        of the answer, spec 7.4); "answer" (1 on the answer tokens); "needle" (1 on the key tokens)."""
        T = len(self.tokens)
        end = self.prompt_len + len(self.answer)
        mask = np.zeros(T, np.int32)
        mask[self.lead : end] = 1
        answer = np.zeros(T, np.int32)
        answer[self.prompt_len : end] = 1
        needle = np.zeros(T, np.int32)
        needle[list(self.key_positions)] = 1
        tokens = self.tokens.copy()
        tokens[end:] = pad_id
        return {"tokens": tokens.astype(np.int32), "mask": mask, "answer": answer, "needle": needle}


class NiahTask:
    """Builds NIAH samples from a haystack token stream.

    kind: "single" | "multi" | "2hop". tokenizer: encode/pad_id/eos_id/landmark_id/vocab_size.
    haystack: 1-D int array (any token stream/corpus; windows are drawn at random offsets and repeated
      if the stream is shorter than the context). chunk_size: the model's S.
    align: "random" (the question's end at a uniform offset within its chunk) or "chunk" (offset 0, the
      authors' layout); see the module docstring.
    """

    def __init__(self, kind: str, tokenizer, haystack, chunk_size: int, *, answer_len: int = 5,
                 n_distractors: int = 5, alphabet: str = "auto", seed: int = 0, align: str = "random"):
        if kind not in KINDS:
            raise TaskError(f"unknown NIAH task {kind!r}; choose one of {', '.join(KINDS)}")
        if align not in ALIGNS:
            raise TaskError(f"align={align!r}: choose one of {', '.join(ALIGNS)}")
        self.kind, self.tok, self.S, self.seed, self.align = kind, tokenizer, int(chunk_size), int(seed), align
        self.answer_len, self.n_distractors = int(answer_len), int(n_distractors)
        hay = np.asarray(haystack, np.int32).ravel()
        specials = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.landmark_id}
        hay = hay[~np.isin(hay, list(specials))]
        if hay.size < 16:
            raise TaskError(f"haystack has only {hay.size} usable tokens; give a longer corpus")
        self.haystack = hay
        if alphabet == "auto":
            alphabet = "alnum" if tokenizer.vocab_size <= 259 else "tokens"
        chars = {"digits": string.digits, "alnum": string.digits + string.ascii_letters}
        if alphabet in chars:
            self.alphabet = np.asarray(sorted({t for c in chars[alphabet] for t in tokenizer.encode(c)}), np.int32)
        elif alphabet == "tokens":
            top = min(tokenizer.vocab_size, 50256)
            self.alphabet = np.asarray([i for i in range(top) if i not in specials], np.int32)
        else:
            raise TaskError(f"alphabet={alphabet!r}: choose 'auto', 'tokens', 'alnum' or 'digits'")
        enc = lambda s: np.asarray(tokenizer.encode(s), np.int32)
        self._enc = enc

    # ---- pieces ---------------------------------------------------------------------------------
    def _var(self, rng) -> np.ndarray:
        return self.alphabet[rng.integers(0, len(self.alphabet), self.answer_len)]

    def _build(self, rng, kind: str | None = None):
        """-> (needles: list of arrays, queried needle index, question, answer, key spans), where a key
        span (needle index, offset, length) locates a value the answer copies inside its needle.
        kind: the task's own kind unless given (a conversation builds a single and a multi question)."""
        e = self._enc
        n = self.answer_len
        kind = self.kind if kind is None else kind
        if kind == "single":
            p = self._var(rng)
            prefix = e("|The passkey is:")
            needles = [np.concatenate([prefix, p, e("|")])]
            question = e("|What is the passkey? The passkey is:")
            return needles, 0, question, p, [(0, len(prefix), n)]
        if kind == "multi":
            keys = [self._var(rng) for _ in range(self.n_distractors + 1)]
            vals = [self._var(rng) for _ in range(self.n_distractors + 1)]
            prefix, sep = e("|One of the special magic numbers for "), e(" is ")
            needles = [np.concatenate([prefix, k, sep, v, e("|")]) for k, v in zip(keys, vals, strict=True)]
            question = np.concatenate([e("|The special magic number for "), keys[0], sep])
            return needles, 0, question, vals[0], [(0, len(prefix) + n + len(sep), n)]
        v = [self._var(rng) for _ in range(6)]
        head, arrow = e("|DEF "), e("->")
        hop = lambda a, b: np.concatenate([head, a, arrow, b, e("|")])
        needles = [hop(v[0], v[1]), hop(v[1], v[2]), hop(v[3], v[4]), hop(v[4], v[5])]
        question = np.concatenate([e("|The path from "), v[0], arrow])
        value_at = len(head) + n + len(arrow)
        return needles, 0, question, np.concatenate([v[1], arrow, v[2]]), [(0, value_at, n), (1, value_at, n)]

    def min_length(self) -> int:
        """Shortest context (tokens) this task fits in."""
        needles, _, question, answer, _ = self._build(np.random.default_rng(0))
        need = sum(len(n) for n in needles) + len(question) + 3 * self.S + 1
        if self.align in ("random", "pad"):  # a question moved a chunk earlier ends at most len(answer) earlier
            need += len(answer)
        if self.align == "pad":  # the lead of pad ids takes up to S - 1 tokens of the haystack's room
            need += self.S - 1
        return int(-(-need // self.S) * self.S)

    def check_length(self, seq_len: int) -> None:
        if seq_len < self.min_length():
            raise TaskError(
                f"context length {seq_len} is too short for the {self.kind} NIAH task with chunk size "
                f"{self.S}: needs >= {self.min_length()} tokens"
            )

    # ---- samples --------------------------------------------------------------------------------
    def sample(self, seq_len: int, depth: float, index: int, offset: int | None = None) -> NiahSample:
        """Sample `index` (deterministic in (seed, seq_len, depth, index)) of context length seq_len.
        offset: the question end's offset within its chunk; None draws it as the task's `align` says."""
        self.check_length(seq_len)
        if not 0.0 <= depth <= 1.0:
            raise TaskError(f"depth {depth} must be in [0, 1]")
        key = self._key(seq_len, depth, index)
        if offset is None:
            offset = self.draw_offset(key)
        if not 0 <= offset < self.S:
            raise TaskError(f"offset {offset} must be in [0, {self.S}) (the chunk size)")
        rng = np.random.default_rng(key)
        needles, q_idx, question, answer, key_spans = self._build(rng)
        lead = (self.S - offset) % self.S if self.align == "pad" else 0
        q_last = question_end(seq_len, self.S, 0 if self.align == "pad" else offset, len(answer))
        q_start = q_last - len(question) + 1
        hay_len = q_start - lead - sum(len(n) for n in needles)  # filler tokens before the question
        assert q_idx == 0  # _build puts the queried needle first
        hay, positions = self._haystack(rng, needles, hay_len, depth, shuffle=self.kind == "2hop")
        body = np.concatenate([np.full(lead, self.tok.pad_id, np.int32), hay, question]).astype(np.int32)
        positions = [p + lead for p in positions]
        assert len(body) == q_last + 1, (len(body), q_last)
        tail = np.full(seq_len - len(body), self.tok.pad_id, np.int32)
        n_ans = min(len(answer), len(tail))
        tail[:n_ans] = answer[:n_ans]
        tokens = np.concatenate([body, tail])
        keys = key_positions(positions, key_spans)
        others = tuple(key_positions(positions, [s]) for s in distractor_spans(key_spans, len(needles)))
        return NiahSample(tokens=tokens, prompt_len=len(body), answer=answer.astype(np.int32),
                          needle_positions=tuple(positions), depth=float(depth), key_positions=keys,
                          distractor_positions=others, offset=int(offset), lead=lead)

    def _haystack(self, rng, needles, hay_len: int, depth: float, *, at_depth: int = 1, shuffle: bool = False):
        """Needles among hay_len filler tokens -> (int32 [hay_len + sum(len(needles))], start of each
        needle in it). needles[:at_depth] go, in order, at `depth` of the room before the end minus 2
        chunks (so they are retrieved from memory, not seen in the question's chunk); the others at
        uniformly random places, in a random order with `shuffle` (2hop)."""
        room = max(0, hay_len - 2 * self.S)
        offsets = [int(round(depth * room))] * at_depth
        others = sorted(int(x) for x in rng.integers(0, room + 1, len(needles) - at_depth))
        rest = list(range(at_depth, len(needles)))
        if shuffle:
            rng.shuffle(rest)
        # Ties (needles at one filler offset) keep the order of their indices.
        placed = sorted(zip(offsets + others, list(range(at_depth)) + rest, strict=True))
        filler = self._filler(rng, hay_len)
        pieces, positions, cursor, out_len = [], [0] * len(needles), 0, 0
        for off, i in placed:
            pieces.append(filler[cursor:off])
            out_len += off - cursor
            positions[i] = out_len
            pieces.append(needles[i])
            out_len += len(needles[i])
            cursor = off
        pieces.append(filler[cursor:])
        return np.concatenate(pieces).astype(np.int32), positions

    def _filler(self, rng, n: int) -> np.ndarray:
        """n haystack tokens from a random start (wrapping around a short haystack)."""
        start = int(rng.integers(0, max(1, len(self.haystack) - n)))
        # Index the window instead of rolling the whole haystack (4M tokens) for every example.
        return self.haystack[(start + np.arange(n)) % len(self.haystack)]

    def _key(self, seq_len: int, depth: float, index: int) -> list[int]:
        """The sample's seed."""
        return [self.seed, int(seq_len), int(round(depth * 1e6)), int(index)]

    def prompt_len(self, seq_len: int, depth: float, index: int) -> int:
        """sample(seq_len, depth, index).prompt_len without building the sample (to batch equal lengths)."""
        key = self._key(seq_len, depth, index)
        answer_len = len(self._build(np.random.default_rng(0))[3])  # the same for every sample of a kind
        offset = 0 if self.align == "pad" else self.draw_offset(key)
        return question_end(seq_len, self.S, offset, answer_len) + 1

    def draw_offset(self, key) -> int:
        """The offset of the sample with seed `key`: 0 when aligned, else uniform in [0, S)."""
        if self.align == "chunk":
            return 0
        return int(np.random.default_rng([*key, _OFFSET_STREAM]).integers(0, self.S))

    def example(self, seq_len: int, index: int, depth: float | None = None) -> dict[str, np.ndarray]:
        """A fine-tuning example; depth drawn uniformly when not given."""
        if depth is None:
            depth = self.draw_depth(index)
        return self.sample(seq_len, depth, index).example(self.tok.pad_id)

    def draw_depth(self, index: int) -> float:
        """The needle depth of fine-tuning example `index`: uniform in [0, 1)."""
        return float(np.random.default_rng([self.seed, 7, int(index)]).random())


# --------------------------------------------------------------------------------------------------
# A two-question conversation (issue 25)
# --------------------------------------------------------------------------------------------------

_PAD, _PROMPT, _ANSWER = 0, 1, 2  # roles of a conversation stream's tokens (ConversationSample.stream)


@dataclasses.dataclass(frozen=True)
class ConversationSample:
    """Two questions on one haystack, the second asked after the answer to the first. Token indices
    (key_positions, needle_positions) count from turn 1's first token, in the conversation without
    the engine's alignment pads (turn 1, answer 1, turn 2, answer 2)."""

    turns: tuple[np.ndarray, np.ndarray]  # int32 [P1], [P2]: what the user sends, without pads
    answers: tuple[np.ndarray, np.ndarray]  # int32 [A1], [A2]: the passkey, the keyed value
    key_positions: tuple[tuple[int, ...], tuple[int, ...]]  # per question: the values it copies (in turn 1)
    # per question: per other needle of its kind, its value's token indices (the passkey has none)
    distractor_positions: tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]
    needle_positions: tuple[int, ...]  # the passkey needle, the queried keyed needle, the distractors
    offsets: tuple[int, int]  # each question's last token's index within its chunk, without pads
    depth: float
    chunk_size: int
    seq_len: int  # the context length it was built for: its aligned stream fits in it

    def pads(self, aligned: bool = True) -> tuple[int, int]:
        """The pads the engine puts before each turn when it aligns prompts (else none)."""
        if not aligned:
            return (0, 0)
        return turn_pads([len(t) for t in self.turns], [len(a) for a in self.answers], self.chunk_size)

    def stream(self, pad_id: int, *, aligned: bool = True, answer1=None) -> tuple[np.ndarray, np.ndarray]:
        """The conversation as the engine feeds it: [pads, turn 1, answer 1, pads, turn 2, answer 2] ->
        (tokens int32 [N], role int32 [N]: 0 pad, 1 prompt, 2 answer). answer1: the model's own first
        answer (what it is given back in evaluation) in place of the true one, of the same length."""
        first = self.answers[0] if answer1 is None else np.asarray(answer1, np.int32)
        if first.shape != self.answers[0].shape:
            raise TaskError(f"answer1 has shape {first.shape}; give {len(self.answers[0])} tokens, the passkey's length")
        pieces = []
        for pad, turn, answer in zip(self.pads(aligned), self.turns, (first, self.answers[1]), strict=True):
            pieces += [(np.full(pad, pad_id, np.int32), _PAD), (turn, _PROMPT), (answer, _ANSWER)]
        tokens = np.concatenate([x for x, _ in pieces]).astype(np.int32)
        role = np.concatenate([np.full(len(x), r, np.int32) for x, r in pieces])
        return tokens, role

    def needle_chunks(self, question: int, pads: int = 0) -> np.ndarray:
        """Sorted chunk ids holding question `question`'s (0 or 1) key tokens; pads: the engine's pads
        before turn 1 (every needle sits in turn 1, so the pads before turn 2 shift none)."""
        return chunks_of(self.key_positions[question], self.chunk_size, pads)

    def distractors(self, question: int, pads: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """Question `question`'s distractors (NiahSample.distractors), read from turn 1."""
        return distractors_of(self.turns[0], self.distractor_positions[question], self.chunk_size, pads)

    def example(self, pad_id: int, aligned: bool = True) -> dict[str, np.ndarray]:
        """Fine-tuning example, int32 [seq_len] each: "tokens" (the stream, then pad ids); "mask" (LM
        loss on every real token up to the end of answer 2, none on the pads); "answer" (1 on both
        answers); "needle" (1 on question 1's key tokens only: the trainer's recall reads the retrieval
        of the first answer's chunk, diagnostics.answer_retrieval_row, which need not fetch question 2's
        needle)."""
        tokens, role = self.stream(pad_id, aligned=aligned)
        out = {k: np.zeros(self.seq_len, np.int32) for k in ("tokens", "mask", "answer", "needle")}
        out["tokens"][:] = pad_id
        out["tokens"][: len(tokens)] = tokens
        out["mask"][: len(tokens)] = role != _PAD
        out["answer"][: len(tokens)] = role == _ANSWER
        out["needle"][np.asarray(self.key_positions[0]) + self.pads(aligned)[0]] = 1
        return out


class ConversationTask:
    """Two-question conversations (issue 25): one haystack holds the single task's passkey needle and
    the multi task's keyed needles (the queried one and n_distractors others). Turn 1 is the haystack
    and the passkey question -> the passkey; turn 2, asked after answer 1, is a few haystack tokens and
    the keyed question -> the queried value. The formats are those of NiahTask (module docstring).

    Each question's end offset is drawn uniformly in [0, S) (0 for align="chunk"): turn 1's last token
    sits at offset o1 of its chunk, and turn 2's at o2 of the conversation without pads, counting
    answer 1 (its filler tokens, 0 .. S - 1 of them, set o2). Turn 1 is as long as lets the aligned
    stream (ConversationSample.stream) fill seq_len at most; depth places the passkey needle and,
    right after it, the queried keyed needle; the distractors go to random places.

    align: the layout of fine-tuning examples: "pad" the engine's (ModelConfig.prompt_align="chunk":
    pads before each turn so that it ends on a chunk's first slot), "random" without pads (what
    prompt_align="none" feeds), "chunk" both offsets 0, where the engine adds no pads: every align is
    what an engine feeds for its offsets, so the task is registered for each (register_niah_tasks).
    """

    kind = "conversation"

    def __init__(self, tokenizer, haystack, chunk_size: int, *, answer_len: int = 5, n_distractors: int = 5,
                 alphabet: str = "auto", seed: int = 0, align: str = "random"):
        # The pieces (encoder, alphabet, haystack, seeds, needle placement) are a multi task's.
        self.niah = NiahTask("multi", tokenizer, haystack, chunk_size, answer_len=answer_len,
                             n_distractors=n_distractors, alphabet=alphabet, seed=seed, align=align)
        self.tok, self.S, self.seed, self.align = tokenizer, int(chunk_size), int(seed), align

    def _build(self, rng):
        """-> (needles, questions, answers, key spans per question, distractor spans per question; needle
        indices among `needles`)."""
        single, _, q1, a1, spans1 = self.niah._build(rng, "single")
        multi, _, q2, a2, spans2 = self.niah._build(rng, "multi")
        shift = lambda spans: [(i + len(single), off, n) for i, off, n in spans]
        others = (distractor_spans(spans1, len(single)), shift(distractor_spans(spans2, len(multi))))
        return single + multi, (q1, q2), (a1, a2), (spans1, shift(spans2)), others

    def min_length(self) -> int:
        """Shortest context (tokens) this task fits in: the needles, turn 1's question and 2 chunks of
        room (NiahTask's rule), both answers, turn 2's question, and S - 1 tokens at most for each of
        turn 1's alignment to the chunk grid, its pads, turn 2's filler and its pads."""
        needles, questions, answers, _, _ = self._build(np.random.default_rng(0))
        need = sum(map(len, needles)) + sum(map(len, questions)) + sum(map(len, answers)) + 2 * self.S + 4 * (self.S - 1)
        return int(-(-need // self.S) * self.S)

    def check_length(self, seq_len: int) -> None:
        if seq_len < self.min_length():
            raise TaskError(f"context length {seq_len} is too short for the NIAH conversation with chunk size "
                            f"{self.S}: needs >= {self.min_length()} tokens")

    def draw_offsets(self, key) -> tuple[int, int]:
        """Both questions' offsets for the sample with seed `key`: 0 when aligned, else uniform in [0, S)."""
        if self.align == "chunk":
            return (0, 0)
        o1, o2 = np.random.default_rng([*key, _OFFSET_STREAM]).integers(0, self.S, 2)
        return int(o1), int(o2)

    def sample(self, seq_len: int, depth: float, index: int, offsets=None) -> ConversationSample:
        """Sample `index` (deterministic in (seed, seq_len, depth, index)). offsets: (o1, o2), or None to
        draw them as `align` says."""
        self.check_length(seq_len)
        if not 0.0 <= depth <= 1.0:
            raise TaskError(f"depth {depth} must be in [0, 1]")
        key = self.niah._key(seq_len, depth, index)
        offsets = self.draw_offsets(key) if offsets is None else tuple(int(o) for o in offsets)
        if len(offsets) != 2 or not all(0 <= o < self.S for o in offsets):
            raise TaskError(f"offsets {offsets} must be two offsets in [0, {self.S}) (the chunk size)")
        rng = np.random.default_rng(key)
        needles, (q1, q2), answers, spans, others = self._build(rng)
        turn1_len, filler = conversation_layout(seq_len, self.S, offsets, [len(a) for a in answers], len(q2))
        hay, positions = self.niah._haystack(rng, needles, turn1_len - len(q1) - sum(map(len, needles)), depth,
                                             at_depth=2)
        turns = (np.concatenate([hay, q1]).astype(np.int32),
                 np.concatenate([self.niah._filler(rng, filler), q2]).astype(np.int32))
        return ConversationSample(turns=turns, answers=tuple(a.astype(np.int32) for a in answers),
                                  key_positions=tuple(key_positions(positions, s) for s in spans),
                                  distractor_positions=tuple(tuple(key_positions(positions, [d]) for d in ds)
                                                             for ds in others),
                                  needle_positions=tuple(positions), offsets=offsets, depth=float(depth),
                                  chunk_size=self.S, seq_len=int(seq_len))

    def example(self, seq_len: int, index: int, depth: float | None = None) -> dict[str, np.ndarray]:
        """A fine-tuning example (ConversationSample.example in the task's layout); depth drawn
        uniformly when not given."""
        depth = self.niah.draw_depth(index) if depth is None else depth
        return self.sample(seq_len, depth, index).example(self.tok.pad_id, aligned=self.align == "pad")


def turn_pads(turn_lens, answer_lens, chunk_size: int) -> tuple[int, ...]:
    """The pads the engine's prompt alignment puts before each turn of a conversation whose turns
    (turn_lens tokens) and answers (answer_lens tokens) alternate: chunking.prompt_padding at each
    turn's start, with everything fed before it (earlier pads included) consumed."""
    pads, consumed = [], 0
    for n, a in zip(turn_lens, answer_lens, strict=True):
        pads.append(prompt_padding(consumed, n, chunk_size))
        consumed += pads[-1] + n + a
    return tuple(pads)


def conversation_layout(seq_len: int, chunk_size: int, offsets, answer_lens, question2_len: int) -> tuple[int, int]:
    """-> (turn 1's length P1, filler tokens F before question 2): the longest turn 1 whose last token
    sits at offset o1 of its chunk ((P1 - 1) % S == o1) and whose aligned conversation (pads, turn 1,
    answer 1, pads, F + question2_len tokens, answer 2) fits in seq_len, with turn 2 ending at offset
    o2 of the conversation without pads ((P1 + A1 + F + question2_len - 1) % S == o2)."""
    S = chunk_size
    (o1, o2), (a1, a2) = offsets, answer_lens
    filler = (o2 - o1 - a1 - question2_len) % S
    turn2 = filler + question2_len
    # Aligned, turn 1 ends on a chunk's first slot, so what follows starts at 1 (mod S): turn 2's pads
    # do not depend on P1.
    after = a1 + prompt_padding(1 + a1, turn2, S) + turn2 + a2
    chunks = (seq_len - 1 - after) // S  # turn 1 and its pads: chunks * S + 1 tokens
    return chunks * S + 1 - (S - o1) % S, filler


def key_positions(positions, key_spans) -> tuple[int, ...]:
    """Token indices of the values that key spans (needle index, offset in it, length) locate, given
    each needle's start."""
    return tuple(positions[i] + off + j for i, off, n in key_spans for j in range(n))


def distractor_spans(key_spans, n_needles: int) -> list[tuple[int, int, int]]:
    """Key spans at the answer's first value's place (offset, length) in every needle the answer does
    not copy from: the values a read-out that finds the needles' format but not the key would copy."""
    used = {i for i, _, _ in key_spans}
    _, off, n = key_spans[0]
    return [(i, off, n) for i in range(n_needles) if i not in used]


def distractors_of(tokens, positions, chunk_size: int, pads: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted chunk ids holding any of the distractor values at `positions` (one tuple of token indices
    per distractor, shifted by `pads`), each distractor's value tokens read from `tokens`)."""
    flat = [p for ps in positions for p in ps]
    return chunks_of(flat, chunk_size, pads), [np.asarray(tokens, np.int32)[list(ps)] for ps in positions]


def chunks_of(positions, chunk_size: int, pads: int = 0) -> np.ndarray:
    """Sorted chunk ids holding token indices `positions`, each shifted by `pads` tokens fed before."""
    return np.unique((np.asarray(positions, np.int64) + pads) // chunk_size)


def question_end(seq_len: int, chunk_size: int, offset: int, answer_len: int) -> int:
    """Index of the question's last token: at `offset` in the last whole chunk, or in the chunk before
    where the answer (answer_len tokens right after it) would not fit in seq_len."""
    S = chunk_size
    q_last = (seq_len // S) * S - S + offset
    if q_last + answer_len >= seq_len:
        q_last -= S
    return q_last


def offset_buckets(chunk_size: int) -> list[tuple[str, int, int]]:
    """Offset buckets (label, lo, hi) covering [0, S) once each, lo <= offset < hi: the aligned layout
    [0, 1), then [1, ceil(S/4)), [ceil(S/4), ceil(3S/4)), [ceil(3S/4), S); empty ones (small S) are left
    out. S = 63 gives 0, 1-15, 16-47, 48-62: one bucket per regime of issue 25's shifted questions."""
    S = int(chunk_size)
    edges = [0, 1, -(-S // 4), -(-3 * S // 4), S]
    return [(f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}", lo, hi)
            for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]


def offset_bucket(offset: int, chunk_size: int) -> str:
    """The label of the bucket of offset_buckets(chunk_size) holding `offset`."""
    for label, lo, hi in offset_buckets(chunk_size):
        if lo <= offset < hi:
            return label
    raise TaskError(f"offset {offset} must be in [0, {chunk_size}) (the chunk size)")


def score_exact(generated: Sequence[int], answer: Sequence[int]) -> bool:
    """Exact match of the whole answer (all tokens)."""
    gen = np.asarray(generated)[: len(answer)]
    return len(gen) == len(answer) and bool(np.all(gen == np.asarray(answer)))


# --------------------------------------------------------------------------------------------------
# Fine-tuning: a random-access source and the task-mixture hook
# --------------------------------------------------------------------------------------------------


class NiahSource:
    """Random-access source of fine-tuning examples {"tokens", "mask"} int32 [seq_len] (a pure function
    of (seed, index)); usable as a grain source."""

    def __init__(self, task: NiahTask, seq_len: int, num_examples: int = 2**30):
        task.check_length(seq_len)
        self.task, self.seq_len, self.num_examples = task, seq_len, num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.task.example(self.seq_len, int(index))


def default_haystack(tokenizer, max_tokens: int = 1 << 20, corpus: str = "default") -> np.ndarray:
    """A haystack token stream (documents joined by eos) from a corpus: a built-in name ("default",
    the Python standard library's sources; "python-all") or a path."""
    from drt_jax.data.corpora import corpus_documents

    ids: list[int] = []
    for doc in corpus_documents(corpus):
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
        if len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], np.int32)


def make_niah_factory(kind: str, chunk_size: int = 63, haystack=None, **task_kwargs):
    """factory(seq_len, tokenizer, seed) -> NiahSource, the signature of drt_jax.data.mixture tasks.
    kind: one of KINDS, or "conversation" (ConversationTask).
    haystack: a token array, or None for the default corpus (read on first use)."""

    def factory(seq_len: int, tokenizer, seed: int):
        hay = default_haystack(tokenizer) if haystack is None else haystack
        if kind == ConversationTask.kind:
            return NiahSource(ConversationTask(tokenizer, hay, chunk_size, seed=seed, **task_kwargs), seq_len)
        return NiahSource(NiahTask(kind, tokenizer, hay, chunk_size, seed=seed, **task_kwargs), seq_len)

    return factory


def register_niah_tasks(chunk_size: int = 63, haystack=None, *, align: str = "pad", overwrite: bool = False,
                        **task_kwargs) -> list[str]:
    """Registers "niah_single", "niah_multi", "niah_2hop" and "niah_conversation" with the trainer's task
    mixture (when drt_jax.data.mixture is importable). Call again with the model's chunk size and the
    run's layout (align, DataConfig.niah_align) and overwrite=True when they are not the defaults (63,
    "pad"). The conversation is registered for every align: each lays it out as an engine feeds it
    (ConversationTask). Returns the names registered."""
    if align not in ALIGNS:
        raise TaskError(f"align={align!r}: choose one of {', '.join(ALIGNS)}")
    try:
        from drt_jax.data.mixture import register_task
    except ImportError:  # the data package (grain) is not installed here
        return []
    names = []
    for kind in (*KINDS, ConversationTask.kind):
        name = f"niah_{kind}"
        register_task(name, make_niah_factory(kind, chunk_size, haystack, align=align, **task_kwargs), overwrite=overwrite)
        names.append(name)
    return names


try:  # register the defaults once (chunk size 63, the paper's); harmless if the mixture is absent
    register_niah_tasks()
except Exception:  # noqa: BLE001 - a registry conflict must not break importing the task module
    pass
