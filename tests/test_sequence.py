"""Sequence templates: exact layouts, regions (target / pad / cond / image_index), eos fill, truncation,
prompts, the task-mixing builder and collate."""

from collections import Counter

import pytest
import torch

from mmdlm.sequence import (
    Batch,
    Layout,
    Sample,
    SequenceBuilder,
    Task,
    caption_prompt,
    caption_sample,
    collate,
    joint_prompt,
    joint_sample,
    mask_target,
    t2i_prompt,
    t2i_sample,
    text_prompt,
    text_sample,
    vqa_prompt,
    vqa_sample,
)
from mmdlm.vocab import Vocab

V = Vocab(text_size=50, codebook_size=8)
L = Layout(caption_len=6, question_len=4, answer_len=3, text_len=10, qa_per_sample=2)
CODES = torch.tensor([[0, 1, 2], [3, 4, 5]])  # h=2, w=3: N=6
IMG = (CODES.flatten() + V.image_offset).tolist()
N = 6


class WordTokenizer:
    """One id per word, assigned on first sight (deterministic within a test)."""

    def __init__(self) -> None:
        self.words: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.words.setdefault(w, len(self.words)) for w in text.split()]


def regions(s: Sample) -> dict[str, list]:
    return {f: getattr(s, f).tolist() for f in ("ids", "target", "pad", "image_index", "cond")}


def test_t2i_layout() -> None:
    s = t2i_sample([7, 8], CODES, V, L)
    assert len(s) == 1 + L.caption_len + 1 + N + 1 and s.task == Task.T2I
    assert s.ids.tolist() == [V.t2i, 7, 8] + [V.pad] * 4 + [V.soi] + IMG + [V.eoi]
    assert s.target.tolist() == [False] * 8 + [True] * N + [False]
    assert s.pad.tolist() == [False] * 3 + [True] * 4 + [False] * (N + 2)
    assert s.cond.tolist() == [False] + [True] * 6 + [False] * (N + 2)  # the whole caption region
    assert s.image_index.tolist() == [-1] * 8 + list(range(N)) + [-1]


def test_caption_layout_has_eos_fill_as_target() -> None:
    s = caption_sample(CODES, [7, 8], V, L)
    assert s.ids.tolist() == [V.mmu, V.soi] + IMG + [V.eoi, V.sep, 7, 8] + [V.eos] * 4
    assert s.target.tolist() == [False] * (N + 4) + [True] * 6
    assert not s.pad.any() and not s.cond.any()
    assert s.image_index.tolist() == [-1, -1] + list(range(N)) + [-1] * 8


def test_vqa_layout_packs_several_pairs() -> None:
    s = vqa_sample(CODES, [([1, 2, 3], [9]), ([4], [10, 11])], V, L)
    head = [V.mmu, V.soi] + IMG + [V.eoi]
    q1 = [1, 2, 3, V.pad, V.sep, 9, V.eos, V.eos]
    q2 = [4, V.pad, V.pad, V.pad, V.sep, 10, 11, V.eos]
    assert s.ids.tolist() == head + q1 + q2
    assert len(s) == N + 3 + 2 * (L.question_len + 1 + L.answer_len)
    answer = [False] * 5 + [True] * 3
    assert s.target.tolist() == [False] * (N + 3) + answer + answer
    pad1, pad2 = [False] * 3 + [True] + [False] * 4, [False] + [True] * 3 + [False] * 4
    assert s.pad.tolist() == [False] * (N + 3) + pad1 + pad2
    assert s.image_index.tolist() == [-1, -1] + list(range(N)) + [-1] * 17
    with pytest.raises(ValueError, match="at least one"):
        vqa_sample(CODES, [], V, L)


def test_joint_and_text_layouts() -> None:
    s = joint_sample(CODES, [7], V, L)
    assert s.ids.tolist() == [V.joint, 7] + [V.eos] * 5 + [V.soi] + IMG + [V.eoi]
    assert s.target.tolist() == [False] + [True] * 6 + [False] + [True] * N + [False]
    t = text_sample([1, 2, 3], V, L)
    assert t.ids.tolist() == [V.text_task, 1, 2, 3] + [V.eos] * 7
    assert t.target.tolist() == [False] + [True] * 10 and not t.pad.any()


def test_truncation_keeps_the_layout_and_is_counted() -> None:
    counter: Counter[str] = Counter()
    long = list(range(20))
    s = t2i_sample(long, CODES, V, L, counter)
    assert len(s) == 1 + L.caption_len + 1 + N + 1 and s.ids[1:7].tolist() == long[:6]
    c = caption_sample(CODES, long, V, L, counter)
    assert len(c) == N + 4 + L.caption_len and V.eos not in c.ids.tolist()
    q = vqa_sample(CODES, [(long, long)], V, L, counter)
    assert len(q) == N + 3 + L.question_len + 1 + L.answer_len
    text_sample(long, V, L, counter)
    assert counter == {"caption": 2, "question": 1, "answer": 1, "text": 1}
    t2i_sample([1, 2], CODES, V, L, counter)  # fits: not counted
    assert sum(counter.values()) == 5


def test_bad_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match="text ids"):
        t2i_sample([V.text_size], CODES, V, L)  # an image id in a text region
    with pytest.raises(ValueError, match="image codes"):
        t2i_sample([1], torch.tensor([[8]]), V, L)
    with pytest.raises(ValueError, match="shape"):
        z, ids = torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long)
        Sample(ids, torch.zeros(2, dtype=torch.bool), z, ids, z, 0)


def test_prompts_mask_exactly_the_target() -> None:
    prompts = [
        (t2i_prompt([7, 8], V, L, N), t2i_sample([7, 8], CODES, V, L)),
        (caption_prompt(CODES, V, L), caption_sample(CODES, [7], V, L)),
        (vqa_prompt(CODES, [1, 2], V, L), vqa_sample(CODES, [([1, 2], [9])], V, L)),
        (vqa_prompt(CODES, [[1, 2], [3]], V, L), vqa_sample(CODES, [([1, 2], [9]), ([3], [9])], V, L)),
        (joint_prompt(V, L, N), joint_sample(CODES, [7], V, L)),
    ]
    for prompt, sample in prompts:
        assert prompt.task == sample.task and len(prompt) == len(sample)
        for f in ("target", "pad", "image_index", "cond"):
            assert torch.equal(getattr(prompt, f), getattr(sample, f)), f
        assert bool((prompt.ids[prompt.target] == V.mask).all())
        assert torch.equal(prompt.ids[~prompt.target], sample.ids[~sample.target])
        assert torch.equal(mask_target(sample, V).ids, prompt.ids)
    p = text_prompt([1, V.mask, V.mask, 4], V, L)
    assert p.ids.tolist() == [V.text_task, 1, V.mask, V.mask, 4] + [V.eos] * 6
    assert p.target.tolist() == [False, False, True, True] + [False] * 7
    # inpainting: mask only part of the image, the rest becomes context
    s = t2i_sample([7], CODES, V, L)
    where = torch.zeros(len(s), dtype=torch.bool)
    where[8:10] = True
    inp = mask_target(s, V, where)
    assert inp.target.nonzero().flatten().tolist() == [8, 9]
    assert inp.ids[8:10].tolist() == [V.mask] * 2 and inp.ids[10:14].tolist() == IMG[2:]


RECORD = {"__key__": "r0", "codes": CODES, "captions": ["a red circle", "a circle that is red"],
          "qa": [{"question": "what color ?", "answer": "red"},
                 {"question": "what shape ?", "answer": "circle"},
                 {"question": "how many ?", "answer": "one"}]}


def test_builder_mixes_tasks_by_weight_and_skips_impossible_ones() -> None:
    b = SequenceBuilder(V, WordTokenizer(), L, {"t2i": 1.0, "vqa": 3.0}, seed=0)
    tasks = Counter(b.build(RECORD).task for _ in range(400))
    assert set(tasks) == {Task.T2I, Task.VQA} and 0.18 < tasks[Task.T2I] / 400 < 0.32
    no_qa = {**RECORD, "qa": []}
    assert {b.build(no_qa).task for _ in range(20)} == {Task.T2I}
    with pytest.raises(ValueError, match="cannot do task VQA"):
        b.build(no_qa, task=Task.VQA)
    with pytest.raises(ValueError, match="none of the weighted tasks"):
        b.build({"captions": ["x"]})  # no codes: neither t2i nor vqa
    # a VQA sample packs min(qa_per_sample, #qa) distinct pairs of the record
    s = b.build(RECORD, task="vqa")
    assert int(s.target.sum()) == L.qa_per_sample * L.answer_len
    assert b.built[Task.VQA] > 0 and b.truncated == Counter()


def test_builder_is_seeded_and_covers_every_task() -> None:
    weights = {t: 1.0 for t in Task}
    b1 = SequenceBuilder(V, WordTokenizer(), L, weights, seed=3)
    b2 = SequenceBuilder(V, WordTokenizer(), L, weights, seed=3)
    document = {"__key__": "d0", "segments": [{"codes": CODES}, {"text": "make it red"}, {"codes": CODES}]}
    for record in [RECORD] * 30 + [document] * 3:
        x, y = b1.build(record), b2.build(record)
        assert x.task == y.task and torch.equal(x.ids, y.ids)
    assert set(b1.built) == set(Task)  # text-only works from captions alone; only a document does DOC
    assert b1.built[Task.DOC] == 3
    with pytest.raises(KeyError, match="unknown task"):
        SequenceBuilder(V, WordTokenizer(), L, {"t2x": 1.0})


def test_collate_pads_at_the_end() -> None:
    samples = [t2i_sample([1], CODES, V, L), text_sample([1, 2], V, L), vqa_sample(CODES, [([1], [2])], V, L)]
    batch = collate(samples, V)
    T = max(len(s) for s in samples)
    assert isinstance(batch, Batch) and len(batch) == 3 and batch.ids.shape == (3, T)
    assert batch.task.tolist() == [Task.T2I, Task.TEXT, Task.VQA]
    for i, s in enumerate(samples):
        n = len(s)
        assert torch.equal(batch.ids[i, :n], s.ids) and torch.equal(batch.target[i, :n], s.target)
        assert torch.equal(batch.pad[i, :n], s.pad) and torch.equal(batch.image_index[i, :n], s.image_index)
        assert bool((batch.ids[i, n:] == V.pad).all()) and bool(batch.pad[i, n:].all())
        assert not batch.target[i, n:].any() and bool((batch.image_index[i, n:] == -1).all())
    moved = batch.to("cpu")
    assert torch.equal(moved.ids, batch.ids) and torch.equal(moved.task, batch.task)
    sub = batch.select(slice(1, 3))
    assert len(sub) == 2 and sub.task.tolist() == [Task.TEXT, Task.VQA] and torch.equal(sub.pad, batch.pad[1:])
