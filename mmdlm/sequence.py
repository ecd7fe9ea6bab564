"""Sequence templates: (task, image codes, text) -> one fixed-layout token sequence + its regions.

Every task is one flat sequence over the joint vocabulary (`mmdlm.vocab`), as in Show-o / MMaDA /
UniDisc, with fixed-length text regions so that every sample of a task has the same layout:

    text-to-image  <t2i> caption(pad-fill) <soi> img*N <eoi>                          target: image
    captioning     <mmu> <soi> img*N <eoi> <sep> caption(eos-fill)                    target: caption
    VQA            <mmu> <soi> img*N <eoi> q1(pad-fill) <sep> a1(eos-fill) q2 ...      target: answers
    joint          <joint> caption(eos-fill) <soi> img*N <eoi>                        target: both
    text-only      <text> text(eos-fill)                                               target: text
    document       <bos> (<soi> img*N <eoi> | <sep> text)*                             target: any segments

A document is interleaved text and images (MMC4 / OBELICS; UniDisc's interleaved model), e.g. an edit
`[source image, instruction, edited image]` or two images and a question about them. Any segment may be the
target. Text regions are fixed, as in the other templates: a given text is `Layout.text_len` tokens (content, then
`<pad>`), a generated one `Layout.segment_len` (content, then the `<eos>` fill). So a segment's place depends only on
the kinds of the segments before it: an edit's result sits at a fixed offset from its source, and copying the
unchanged part is one relative shift (variable-length given texts make edits that change the rest of the scene:
BENCHMARKS.md, "Editing"). Each image
has its own 2D positions (`image_index` restarts at 0 per image), and the segments' order is in the 1D (RoPE)
positions.

Condition regions are filled with `<pad>` (not attended, never a target). Generated text regions are
filled with `<eos>` after the content and the fill is part of the target, as in LLaDA: the model
learns where a text ends, and the sampler needs no length. Text longer than its region is truncated
and counted (`counter`), never allowed to shift the layout.

`Sample` / `Batch` and their fields are the contract of docs/INTERFACES.md. Prompt builders
(`t2i_prompt`, `caption_prompt`, `vqa_prompt`, `joint_prompt`, `text_prompt`) give the inference
pipeline the same layouts with the target region set to `<mask>`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import IntEnum

import torch

from mmdlm.vocab import Vocab


class Task(IntEnum):
    T2I = 0  # text-to-image
    CAPTION = 1  # image-to-text
    VQA = 2  # visual question answering
    JOINT = 3  # image and caption together
    TEXT = 4  # text-only masked-diffusion LM
    DOC = 5  # an interleaved document: text and image segments, any of them generated


@dataclass
class Sample:
    """One sequence. All tensors are [T]; see docs/INTERFACES.md."""

    ids: torch.Tensor  # Long[T] token ids
    target: torch.Tensor  # Bool[T] the region the loss / sampler works on
    pad: torch.Tensor  # Bool[T] True = not attended, never a target
    image_index: torch.Tensor  # Long[T] -1 at non-image positions, else 0..N-1 raster index
    cond: torch.Tensor  # Bool[T] condition positions dropped for classifier-free guidance
    task: int  # a Task
    prefix: int = -1  # positions [0, prefix) are the prompt: everything before the template's first generated
    #   region (`ModelConfig.prefix_attention` keeps them from attending to the rest). -1: the first target

    def __post_init__(self) -> None:
        T = self.ids.shape[0]
        if self.prefix < 0:
            self.prefix = int(self.target.long().argmax()) if bool(self.target.any()) else T
        for f in ("target", "pad", "image_index", "cond"):
            if getattr(self, f).shape != (T,):
                raise ValueError(f"Sample.{f} has shape {tuple(getattr(self, f).shape)}, ids has ({T},)")
        if bool((self.target & self.pad).any()):
            raise ValueError("a pad position cannot be a target")

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class Batch:
    """Samples stacked to [B, T] (padded at the end by `collate`), plus `task` Long[B]."""

    ids: torch.Tensor  # Long[B, T]
    target: torch.Tensor  # Bool[B, T]
    pad: torch.Tensor  # Bool[B, T]
    image_index: torch.Tensor  # Long[B, T]
    cond: torch.Tensor  # Bool[B, T]
    task: torch.Tensor  # Long[B]
    prefix: torch.Tensor | None = None  # Long[B] `Sample.prefix`; None: each row's first target (T if none)

    def __post_init__(self) -> None:
        if self.prefix is None:
            T = self.target.shape[1]
            first = self.target.long().argmax(1)  # (B,)
            self.prefix = torch.where(self.target.any(1), first, T)  # (B,)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def select(self, index: slice | torch.Tensor | list[int]) -> Batch:
        """The sub-batch of some rows (a slice, indices or Bool[B]), e.g. a few samples to show."""
        return Batch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass(frozen=True)
class Layout:
    """Fixed region lengths (in text tokens). Fixed so a task's samples share one layout and batch
    without per-sample shapes; the defaults fit shapes-world text under a small BPE with room to spare."""

    caption_len: int = 24  # shapes captions are <= ~20 BPE tokens (two objects with size/colour/place)
    question_len: int = 16  # shapes questions are ~6-10 tokens; the rest is pad (costs attention only)
    answer_len: int = 8  # answers are 1-3 tokens; the eos fill teaches the model where the answer ends
    text_len: int = 48  # text-only infilling runs on whole captions / QA pairs
    # QA pairs of the same image packed into one VQA sequence. One answer region is a few tokens
    # against N (~64) image tokens, so a single-QA sample gives understanding little supervision per
    # forward (founding measurements, BENCHMARKS.md: the VQA loss went flat at the level of guessing);
    # 3 pairs triple it for ~25 more positions. The cost: answers can hint at each other (as questions
    # already do); a prompt may ask one question or several (`vqa_prompt`).
    qa_per_sample: int = 3
    segment_len: int = 24  # a generated text segment of a document (content + <eos> fill): as long as a caption

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"Layout.{f.name} must be >= 1, got {getattr(self, f.name)}")


class _Builder:
    """Appends regions left to right and stacks them into a `Sample`."""

    def __init__(self, vocab: Vocab, counter: Counter[str] | None) -> None:
        self.vocab, self.counter = vocab, counter
        self.ids: list[int] = []
        self.target: list[bool] = []
        self.pad: list[bool] = []
        self.image_index: list[int] = []
        self.cond: list[bool] = []
        self.prefix: int | None = None  # where the first generated region starts

    def _push(self, ids: Sequence[int], target: bool = False, pad: Sequence[bool] | None = None,
              image_index: Sequence[int] | None = None, cond: bool = False) -> None:
        n = len(ids)
        if target and self.prefix is None:
            self.prefix = len(self.ids)
        self.ids += list(ids)
        self.pad += list(pad) if pad is not None else [False] * n
        self.target += [target and not p for p in (pad if pad is not None else [False] * n)]
        self.image_index += list(image_index) if image_index is not None else [-1] * n
        self.cond += [cond] * n

    def token(self, token_id: int) -> None:
        self._push([token_id])

    def _fit(self, ids: Sequence[int], length: int, region: str) -> list[int]:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab.text_size and i != self.vocab.mask for i in ids):
            raise ValueError(f"{region}: text ids must lie in [0, {self.vocab.text_size}) (or be <mask>)")
        if len(ids) > length:
            if self.counter is not None:
                self.counter[region] += 1
            ids = ids[:length]
        return ids

    def condition_text(self, ids: Sequence[int], length: int, region: str, cond: bool = False) -> None:
        """A read-only text region: content, then `<pad>` (not attended, not a target)."""
        ids = self._fit(ids, length, region)
        fill = length - len(ids)
        self._push(ids + [self.vocab.pad] * fill, pad=[False] * len(ids) + [True] * fill, cond=cond)

    def target_text(self, ids: Sequence[int] | None, length: int, region: str, target: bool = True) -> None:
        """A generated text region: content then `<eos>` fill, all of it a target (LLaDA).
        `ids=None`: unknown content, the whole region is `<mask>`."""
        if ids is None:
            self._push([self.vocab.mask] * length, target=target)
            return
        ids = self._fit(ids, length, region)
        self._push(ids + [self.vocab.eos] * (length - len(ids)), target=target)

    def image(self, codes: torch.Tensor | None, n_tokens: int | None = None, target: bool = False,
              cond: bool = False) -> None:
        """`<soi> img*N <eoi>`; `codes` Long[h, w] (raster order) or None for N `<mask>` tokens."""
        if codes is not None:
            ids = self.vocab.image_to_token(torch.as_tensor(codes).reshape(-1)).tolist()
        elif n_tokens is not None and n_tokens > 0:
            ids = [self.vocab.mask] * n_tokens
        else:
            raise ValueError("an image region needs codes or a positive n_tokens")
        self.token(self.vocab.soi)
        self._push(ids, target=target, image_index=range(len(ids)), cond=cond)
        self.token(self.vocab.eoi)

    def build(self, task: Task) -> Sample:
        return Sample(
            ids=torch.tensor(self.ids, dtype=torch.long),
            target=torch.tensor(self.target, dtype=torch.bool),
            pad=torch.tensor(self.pad, dtype=torch.bool),
            image_index=torch.tensor(self.image_index, dtype=torch.long),
            cond=torch.tensor(self.cond, dtype=torch.bool),
            task=int(task),
            prefix=len(self.ids) if self.prefix is None else self.prefix,
        )


# ---- training templates: one function per task -------------------------------------------------------
def t2i_sample(caption_ids: Sequence[int], codes: torch.Tensor | None, vocab: Vocab, layout: Layout,
               counter: Counter[str] | None = None, n_image_tokens: int | None = None) -> Sample:
    """`<t2i> caption(pad-fill) <soi> img*N <eoi>`; target = image, cond = caption region."""
    b = _Builder(vocab, counter)
    b.token(vocab.t2i)
    b.condition_text(caption_ids, layout.caption_len, "caption", cond=True)
    b.image(codes, n_image_tokens, target=True)
    return b.build(Task.T2I)


def caption_sample(codes: torch.Tensor, caption_ids: Sequence[int] | None, vocab: Vocab, layout: Layout,
                   counter: Counter[str] | None = None) -> Sample:
    """`<mmu> <soi> img*N <eoi> <sep> caption(eos-fill)`; target = caption region."""
    b = _Builder(vocab, counter)
    b.token(vocab.mmu)
    b.image(codes)
    b.token(vocab.sep)
    b.target_text(caption_ids, layout.caption_len, "caption")
    return b.build(Task.CAPTION)


def vqa_sample(codes: torch.Tensor, qa: Sequence[tuple[Sequence[int], Sequence[int] | None]], vocab: Vocab,
               layout: Layout, counter: Counter[str] | None = None) -> Sample:
    """`<mmu> <soi> img*N <eoi> q1(pad-fill) <sep> a1(eos-fill) q2 <sep> a2 ...`; target = answers.

    `qa`: (question ids, answer ids or None for a masked answer) pairs, at least one.
    """
    if not qa:
        raise ValueError("vqa_sample needs at least one (question, answer) pair")
    b = _Builder(vocab, counter)
    b.token(vocab.mmu)
    b.image(codes)
    for question, answer in qa:
        b.condition_text(question, layout.question_len, "question")
        b.token(vocab.sep)
        b.target_text(answer, layout.answer_len, "answer")
    return b.build(Task.VQA)


def joint_sample(codes: torch.Tensor | None, caption_ids: Sequence[int] | None, vocab: Vocab, layout: Layout,
                 counter: Counter[str] | None = None, n_image_tokens: int | None = None) -> Sample:
    """`<joint> caption(eos-fill) <soi> img*N <eoi>`; target = caption and image. The caption comes first: a model
    that decodes in sequence order (the AR twin, block diffusion) writes the caption, then draws the image it
    describes (a masked-diffusion model reads both ways either way)."""
    b = _Builder(vocab, counter)
    b.token(vocab.joint)
    b.target_text(caption_ids, layout.caption_len, "caption")
    b.image(codes, n_image_tokens, target=True)
    return b.build(Task.JOINT)


def text_sample(text_ids: Sequence[int] | None, vocab: Vocab, layout: Layout,
                counter: Counter[str] | None = None) -> Sample:
    """`<text> text(eos-fill)`; target = the text region."""
    b = _Builder(vocab, counter)
    b.token(vocab.text_task)
    b.target_text(text_ids, layout.text_len, "text")
    return b.build(Task.TEXT)


@dataclass(frozen=True)
class Segment:
    """One segment of an interleaved document: a text (`text`, ids) or an image (`codes`, Long[h, w]).

    A target segment is generated. Its content may be unknown (None: all `<mask>`); an image then needs
    `n_tokens`, and a text region is `length` tokens (default `Layout.segment_len`).
    """

    image: bool  # the modality: an image segment, else text
    text: tuple[int, ...] | None = None  # text ids (< vocab.text_size)
    codes: torch.Tensor | None = None  # Long[h, w] VQ codes, raster order
    target: bool = False  # generated rather than given
    length: int | None = None  # a target text's region (content + <eos> fill); None: Layout.segment_len
    n_tokens: int | None = None  # a target image without codes: its token count

    def __post_init__(self) -> None:
        if self.image and self.text is not None or not self.image and self.codes is not None:
            raise ValueError("a segment is either a text (text=) or an image (codes=), not both")
        if self.image and self.codes is None and not (self.target and self.n_tokens):
            raise ValueError("an image segment needs codes, or target=True and n_tokens")
        if not self.image and self.text is None and not self.target:
            raise ValueError("a given text segment needs its text ids")

    @classmethod
    def of_text(cls, ids: Sequence[int] | None, target: bool = False, length: int | None = None) -> Segment:
        return cls(image=False, text=None if ids is None else tuple(int(i) for i in ids), target=target,
                   length=length)

    @classmethod
    def of_image(cls, codes: torch.Tensor | None, target: bool = False, n_tokens: int | None = None) -> Segment:
        return cls(image=True, codes=None if codes is None else torch.as_tensor(codes), target=target,
                   n_tokens=n_tokens)


def document_sample(segments: Sequence[Segment], vocab: Vocab, layout: Layout,
                    counter: Counter[str] | None = None) -> Sample:
    """`<bos>` then each segment in order: `<soi> img*N <eoi>` or `<sep> text`; target = the target segments.

    A given text is a `layout.text_len` region (content, then `<pad>`; truncation counted); a target text is a
    `length` region with the `<eos>` fill. When a target is an image, the given segments are the condition that
    classifier-free guidance drops (`cond`), as the caption of text-to-image is; text targets are read without
    dropout, as captions and answers are.
    """
    if not segments:
        raise ValueError("a document needs at least one segment")
    guided = any(s.target and s.image for s in segments)
    b = _Builder(vocab, counter)
    b.token(vocab.bos)
    for s in segments:
        cond = guided and not s.target
        if s.image:
            b.image(s.codes, s.n_tokens, target=s.target, cond=cond)
            continue
        b.token(vocab.sep)
        if s.target:
            b.target_text(s.text, s.length or layout.segment_len, "segment")
        else:
            b.condition_text(s.text, layout.text_len, "segment", cond=cond)
    return b.build(Task.DOC)


# ---- prompts for inference: the same layouts with the target region masked -----------------------------
def mask_target(sample: Sample, vocab: Vocab, where: torch.Tensor | None = None) -> Sample:
    """Set the target positions to `<mask>`. With `where` (Bool[T]) only those target positions are
    masked and stay targets; the others become given context (inpainting)."""
    target = sample.target if where is None else sample.target & where
    ids = torch.where(target, torch.full_like(sample.ids, vocab.mask), sample.ids)
    return replace(sample, ids=ids, target=target)


def t2i_prompt(caption_ids: Sequence[int], vocab: Vocab, layout: Layout, n_image_tokens: int) -> Sample:
    """Text-to-image prompt: the image region is all `<mask>` (the target)."""
    return t2i_sample(caption_ids, None, vocab, layout, n_image_tokens=n_image_tokens)


def caption_prompt(image_codes: torch.Tensor, vocab: Vocab, layout: Layout) -> Sample:
    """Captioning prompt: the caption region is all `<mask>` (the target)."""
    return caption_sample(image_codes, None, vocab, layout)


def vqa_prompt(image_codes: torch.Tensor, question_ids: Sequence[int] | Sequence[Sequence[int]],
               vocab: Vocab, layout: Layout) -> Sample:
    """VQA prompt: one question (list of ids) or several (list of lists, answered together, as in
    training); every answer region is all `<mask>` (the target)."""
    if isinstance(question_ids, torch.Tensor):
        question_ids = question_ids.tolist()
    questions = [question_ids] if question_ids and isinstance(question_ids[0], int) else list(question_ids)
    if not questions:
        raise ValueError("vqa_prompt needs a question")
    return vqa_sample(image_codes, [(q, None) for q in questions], vocab, layout)


def joint_prompt(vocab: Vocab, layout: Layout, n_image_tokens: int) -> Sample:
    """Joint generation prompt: image and caption regions all `<mask>` (both targets)."""
    return joint_sample(None, None, vocab, layout, n_image_tokens=n_image_tokens)


def text_prompt(text_ids: Sequence[int], vocab: Vocab, layout: Layout) -> Sample:
    """Text infilling prompt: `text_ids` holds `vocab.mask` at the spans to fill; those are the target
    (the rest of the text and its eos fill are given)."""
    sample = text_sample(text_ids, vocab, layout)
    return replace(sample, target=sample.target & (sample.ids == vocab.mask))


def document_prompt(segments: Sequence[Segment], vocab: Vocab, layout: Layout) -> Sample:
    """Document prompt: the target segments all `<mask>` (the given content of a target segment, if any, is
    dropped), the others given."""
    return mask_target(document_sample(segments, vocab, layout), vocab)


# ---- the training-time builder ---------------------------------------------------------------------------
# the shapes recipes' mix (configs/*-shapes.yaml): captioning at half the rate of text-to-image and VQA (its
# targets are long and learn fast), joint generation and text-only infilling as side tasks
DEFAULT_TASK_WEIGHTS: dict[Task, float] = {Task.T2I: 1.0, Task.VQA: 1.0, Task.CAPTION: 0.5, Task.JOINT: 0.25,
                                           Task.TEXT: 0.25, Task.DOC: 1.0}  # DOC: only documents can do it


def _task_of(key: Task | str | int) -> Task:
    if isinstance(key, str):
        try:
            return Task[key.upper()]
        except KeyError:
            known = ", ".join(t.name.lower() for t in Task)
            raise KeyError(f"unknown task {key!r}; known: {known}") from None
    return Task(key)


class SequenceBuilder:
    """Turns data records into training `Sample`s, picking a task per record by weight.

    Args:
        vocab: the joint vocabulary.
        text_tokenizer: anything with `encode(str) -> list[int]` (ids < vocab.text_size).
        layout: region lengths.
        task_weights: task (`Task` or its name, e.g. "t2i", "vqa") -> relative weight; tasks a record
            cannot do (no `codes`, no `qa`) are skipped for that record.
        seed: seed of the builder's own random generator (task, caption and QA choices).

    `truncated` counts truncated text regions by name; `built` counts samples by task.
    """

    def __init__(self, vocab: Vocab, text_tokenizer, layout: Layout | None = None,
                 task_weights: Mapping[Task | str, float] | None = None, seed: int = 0) -> None:
        self.vocab, self.tok = vocab, text_tokenizer
        self.layout = layout or Layout()
        weights = DEFAULT_TASK_WEIGHTS if task_weights is None else task_weights
        self.task_weights = {_task_of(k): float(w) for k, w in weights.items()}
        if any(w < 0 for w in self.task_weights.values()) or not any(self.task_weights.values()):
            raise ValueError(f"task_weights must be >= 0 with one > 0, got {dict(weights)}")
        self.rng = random.Random(seed)
        self.truncated: Counter[str] = Counter()
        self.built: Counter[Task] = Counter()

    @staticmethod
    def can_do(record: Mapping, task: Task) -> bool:
        """Whether a record has what the task needs."""
        has_codes = record.get("codes") is not None
        has_captions = bool(record.get("captions"))
        needs = {
            Task.T2I: has_codes and has_captions,
            Task.CAPTION: has_codes and has_captions,
            Task.VQA: has_codes and bool(record.get("qa")),
            Task.JOINT: has_codes and has_captions,
            Task.TEXT: has_captions,
            Task.DOC: bool(record.get("segments")) and all(
                "text" in seg or seg.get("codes") is not None for seg in record.get("segments") or ()),
        }
        return needs[task]

    def _encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        if any(not 0 <= i < self.vocab.text_size for i in ids):
            raise ValueError(f"text tokenizer gave ids outside [0, {self.vocab.text_size}) for {text!r}")
        return ids

    def document(self, record: Mapping, rng: random.Random) -> list[Segment]:
        """A document record's segments, the target drawn from the record's `targets` (default any segment): one
        segment, or a group of them generated together (an entry that is a list of indices)."""
        segments = record["segments"]
        drawn = rng.choice(list(record.get("targets") or range(len(segments))))
        group = set(drawn) if isinstance(drawn, list) else {drawn}
        return [Segment.of_text(self._encode(seg["text"]), target=i in group) if "text" in seg
                else Segment.of_image(seg["codes"], target=i in group) for i, seg in enumerate(segments)]

    def build(self, record: Mapping, task: Task | str | None = None,
              rng: random.Random | None = None) -> Sample:
        """One training sample from a record (`codes` Long[h, w], `captions`, `qa`; or a document's `segments`)."""
        rng = rng or self.rng
        if task is None:
            tasks = [t for t, w in self.task_weights.items() if w > 0 and self.can_do(record, t)]
            if not tasks:
                raise ValueError(f"record {record.get('__key__', '?')!r} can do none of the weighted tasks "
                                 f"{[t.name for t, w in self.task_weights.items() if w > 0]}")
            task = rng.choices(tasks, weights=[self.task_weights[t] for t in tasks])[0]
        else:
            task = _task_of(task)
            if not self.can_do(record, task):
                raise ValueError(f"record {record.get('__key__', '?')!r} cannot do task {task.name}")
        codes = torch.as_tensor(record["codes"]) if record.get("codes") is not None else None
        layout, counter = self.layout, self.truncated
        if task == Task.VQA:
            # 1..qa_per_sample pairs: inference asks one question, so training must see that layout too
            k = rng.randint(1, min(layout.qa_per_sample, len(record["qa"])))
            pairs = rng.sample(list(record["qa"]), k)
            qa = [(self._encode(p["question"]), self._encode(p["answer"])) for p in pairs]
            sample = vqa_sample(codes, qa, self.vocab, layout, counter)
        elif task == Task.DOC:
            sample = document_sample(self.document(record, rng), self.vocab, layout, counter)
        else:
            caption = self._encode(rng.choice(list(record["captions"])))
            templates = {
                Task.T2I: lambda: t2i_sample(caption, codes, self.vocab, layout, counter),
                Task.CAPTION: lambda: caption_sample(codes, caption, self.vocab, layout, counter),
                Task.JOINT: lambda: joint_sample(codes, caption, self.vocab, layout, counter),
                Task.TEXT: lambda: text_sample(caption, self.vocab, layout, counter),
            }
            sample = templates[task]()
        self.built[task] += 1
        return sample


def generated_image(image_index: torch.Tensor, target: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Long[N]: the positions, in raster order, of a row's generated image (the first image holding a target: an
    edit's result, not its source), or of its only image. `image_index` Long[T], `target` Bool[T] (a `Sample`'s or
    a `Batch` row's; every image of a row is laid out in raster order)."""
    at = (image_index >= 0).nonzero().squeeze(1).view(-1, tokens_per_image)  # (n_images, N) positions
    return at[int(target[at].any(1).long().argmax())]  # (N,)


def collate(samples: Sequence[Sample], vocab: Vocab) -> Batch:
    """Stack samples into a `Batch`, padding each at the end to the longest (`<pad>`, pad=True)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    B, T = len(samples), max(len(s) for s in samples)
    batch = Batch(
        ids=torch.full((B, T), vocab.pad, dtype=torch.long),
        target=torch.zeros(B, T, dtype=torch.bool),
        pad=torch.ones(B, T, dtype=torch.bool),
        image_index=torch.full((B, T), -1, dtype=torch.long),
        cond=torch.zeros(B, T, dtype=torch.bool),
        task=torch.tensor([s.task for s in samples], dtype=torch.long),
        prefix=torch.tensor([s.prefix for s in samples], dtype=torch.long),
    )
    for i, s in enumerate(samples):
        n = len(s)
        batch.ids[i, :n] = s.ids
        batch.target[i, :n] = s.target
        batch.pad[i, :n] = s.pad
        batch.image_index[i, :n] = s.image_index
        batch.cond[i, :n] = s.cond
    return batch


def target_regions(target: torch.Tensor) -> list[torch.Tensor]:
    """Bool[T] -> index tensors of each maximal run of True (the separate target regions of a row)."""
    idx = target.nonzero().squeeze(1)
    if idx.numel() == 0:
        return []
    breaks = (idx[1:] != idx[:-1] + 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(idx, breaks.tolist()))
