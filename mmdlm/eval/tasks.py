"""The evaluation tasks and the whole evaluation: one `eval_*` function per task (a pipeline, records and a
`SamplerConfig` in, a `TaskResult` of JSON metrics and shown examples out), `TASKS` (task name -> how
`run_evaluation` calls it) and `evaluate` / `run_evaluation`, which run the chosen tasks on the first `limit`
val records and put the metrics of `metrics.json` together (the package docstring, `mmdlm.eval`, describes them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmdlm.eval.metrics import mean_dicts, normalize, rate
from mmdlm.eval.records import batches, documents, load_records, stack_images
from mmdlm.eval.timing import Timer
from mmdlm.worlds.scoring import CaptionsWorld, World, world_for

if TYPE_CHECKING:  # the pipeline (and with it the model stack) loads lazily
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SamplerConfig

ALL_TASKS: tuple[str, ...] = ("vqa", "caption", "t2i", "joint", "nll")
NLL_TASKS: tuple[str, ...] = ("t2i", "caption", "vqa", "joint")  # Task names laid out for the NLL
N_EXAMPLES = 6  # examples per task kept for the report and samples.png


# ---------------------------------------------------------------------------------------------
# options, costs, results


# evaluation task -> the pipeline task whose default sampler it uses (`MMDLMPipeline.sampler`)
PIPELINE_TASK: dict[str, str] = {"vqa": "answer", "caption": "caption", "t2i": "text_to_image", "joint": "joint",
                                 "edit": "edit", "what_changed": "answer"}
GUIDED_TASKS = ("t2i", "edit")  # the tasks whose --guidance flags apply: an image drawn from a condition


@dataclass
class Cost:
    """Forward passes and wall-clock of the model calls of one task."""

    batch_size: int
    nfe: list[int] = field(default_factory=list)  # per call
    seconds: float = 0.0
    samples: int = 0

    def add(self, nfe: int, seconds: float, samples: int) -> None:
        self.nfe.append(int(nfe))
        self.seconds += seconds
        self.samples += samples

    def to_dict(self) -> dict:
        calls = len(self.nfe)
        return {"nfe_per_call": sum(self.nfe) / max(calls, 1), "calls": calls, "nfe_total": sum(self.nfe),
                "samples": self.samples, "batch_size": self.batch_size, "seconds": round(self.seconds, 3),
                "seconds_per_sample": self.seconds / max(self.samples, 1)}


@dataclass
class Example:
    """One shown sample: an image and the text under it (prompt, caption, question and answers)."""

    image: torch.Tensor  # Float[3, H, W] in [0, 1]
    text: str


@dataclass
class TaskResult:
    metrics: dict  # JSON-serialisable
    examples: list[Example] = field(default_factory=list)


@dataclass
class Evaluation:
    metrics: dict  # the content of metrics.json
    examples: dict[str, list[Example]]  # task -> examples for samples.png


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


def _fits(pipe: MMDLMPipeline, text: str, limit: int) -> bool:
    return len(pipe.tokenizer.encode(text)) <= limit


# ---------------------------------------------------------------------------------------------
# tasks


def eval_vqa(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
             batch_size: int = 64, seed: int = 0, progress: bool = True,
             options: Mapping[str, Any] | None = None) -> TaskResult:
    """VQA accuracy (exact match after strip/lower) over every QA pair of the records, per type too.
    `options`: further keyword arguments of `pipe.answer` (`draft=`, `revision=`)."""
    pairs = [(r, qa) for r in records for qa in r.get("qa") or []]
    askable = [(r, qa) for r, qa in pairs if _fits(pipe, qa["question"], pipe.layout.question_len)]
    cost = Cost(batch_size)
    answers: dict[int, str] = {}  # id(qa) -> predicted answer
    with _progress(len(askable), "vqa", progress) as bar:
        for b, chunk in batches(askable, batch_size):
            with Timer(pipe.device) as t:
                out = pipe.answer(stack_images([r for r, _ in chunk]), [qa["question"] for _, qa in chunk],
                                  seed=seed + b, sampler=sampler, **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            answers.update({id(qa): text for (_, qa), text in zip(chunk, out.texts)})
            bar.update(len(chunk))
    by_type: dict[str, list[float]] = defaultdict(list)
    for _, qa in pairs:
        predicted = answers.get(id(qa))
        right = predicted is not None and predicted.strip().lower() == qa["answer"].strip().lower()
        by_type[qa.get("type", "unknown")].append(float(right))
    first_per_record = list({r["__key__"]: (r, qa) for r, qa in reversed(askable)}.values())[::-1]
    shown = [{"key": r["__key__"], "question": qa["question"], "predicted": answers[id(qa)], "answer": qa["answer"]}
             for r, qa in first_per_record[:N_EXAMPLES]]
    examples = [Example(r["image"], f"Q: {qa['question']}\npred: {answers[id(qa)]} | true: {qa['answer']}")
                for r, qa in first_per_record[:N_EXAMPLES]]
    scores = [s for v in by_type.values() for s in v]
    metrics = {"accuracy": sum(scores) / max(len(scores), 1), "n": len(scores),
               "too_long": len(pairs) - len(askable),
               "per_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())},
               "cost": cost.to_dict(), "examples": shown}
    return TaskResult(metrics, examples)


def eval_caption(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
                 batch_size: int = 64, seed: int = 0, progress: bool = True,
                 world: World | None = None, options: Mapping[str, Any] | None = None) -> TaskResult:
    """Captioning: exact match, BLEU-4 and the world's caption scores (shapes: per-attribute P/R/F1).
    `options`: further keyword arguments of `pipe.caption` (`draft=`, `revision=`)."""
    from torchmetrics.text import BLEUScore

    world = world or world_for(records, pipe.vq.image_size)
    cost = Cost(batch_size)
    texts: list[str] = []
    with _progress(len(records), "caption", progress) as bar:
        for b, chunk in batches(records, batch_size):
            with Timer(pipe.device) as t:
                out = pipe.caption(stack_images(chunk), seed=seed + b, sampler=sampler, **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            texts += out.texts
            bar.update(len(chunk))
    counts = [world.caption_counts(text, r) for text, r in zip(texts, records)]
    bleu = BLEUScore(n_gram=4)([normalize(t) for t in texts], [[normalize(c) for c in r["captions"]] for r in records])
    shown = [{"key": r["__key__"], "predicted": t, "caption": r["captions"][0]}
             for t, r in zip(texts[:N_EXAMPLES], records)]
    metrics = {**world.caption_summary(counts), "bleu4": float(bleu), "n": len(records),
               "cost": cost.to_dict(), "examples": shown}
    examples = [Example(r["image"], f"generated: {t}\ntrue: {r['captions'][0]}")
                for t, r in zip(texts[:N_EXAMPLES], records)]
    return TaskResult(metrics, examples)


def eval_t2i(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
             batch_size: int = 64, seed: int = 0, progress: bool = True, world: World | None = None,
             scorer_ceiling: bool = True, options: Mapping[str, Any] | None = None) -> TaskResult:
    """Text-to-image from each record's canonical caption, scored by the world's scorer (see module doc).
    `options`: further keyword arguments of `pipe.text_to_image` (`best_of=`, `draft=`, `revision=`).

    A prompt longer than the model's caption region cannot be given: it scores 0 (`too_long`).
    With `scorer_ceiling`, also the scorer on the ground-truth images and their VQ reconstructions.
    Data without a scorer (a `CaptionsWorld` given none) is not scored: `skipped` says why.
    """
    world = world or world_for(records, pipe.vq.image_size)
    if world.scorer is None:
        return TaskResult({"skipped": "no image scorer for this data (pass --scorer module:function)",
                           "n": 0})
    prompts = [r["captions"][0] for r in records]
    usable = [i for i, p in enumerate(prompts) if _fits(pipe, p, pipe.layout.caption_len)]
    cost = Cost(batch_size)
    scores: dict[int, dict[str, float]] = {}
    examples: list[Example] = []
    with _progress(len(usable), "t2i", progress) as bar:
        for b, chunk in batches(usable, batch_size):
            with Timer(pipe.device) as t:
                out = pipe.text_to_image([prompts[i] for i in chunk], seed=seed + b, sampler=sampler,
                                         **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            batch_records = [records[i] for i in chunk]
            scores.update(zip(chunk, world.score_images(out.images, batch_records)))
            examples += [Example(img, prompts[i]) for img, i in zip(out.images, chunk)][: N_EXAMPLES - len(examples)]
            bar.update(len(chunk))
    zero = dict.fromkeys(world.image_keys, 0.0)
    metrics = {**mean_dicts([scores.get(i, zero) for i in range(len(records))]), "n": len(records),
               "too_long": len(records) - len(usable), "scorer": world.scorer, "cost": cost.to_dict()}
    if scorer_ceiling:
        ceiling = eval_scorer(pipe, records, world, batch_size)
        metrics["scorer_on_ground_truth"] = ceiling["ground_truth"]
        metrics["scorer_on_reconstructions"] = ceiling["reconstructions"]
    return TaskResult(metrics, examples)


@torch.no_grad()
def eval_scorer(pipe: MMDLMPipeline, records: Sequence[dict], world: World | None = None,
                batch_size: int = 64) -> dict[str, dict[str, float]]:
    """The image scorer on the ground-truth images (its own accuracy) and on their VQ reconstructions
    decode(encode(x)) (the most text-to-image can reach through this tokenizer)."""
    world = world or world_for(records, pipe.vq.image_size)
    truth, recon = [], []
    for _, chunk in batches(records, batch_size):
        images = stack_images(chunk)
        truth += world.score_images(images, chunk)
        rebuilt = pipe.vq.decode(pipe.encode_images(images)).cpu()  # (B, 3, H, W)
        recon += world.score_images(rebuilt, chunk)
    return {"ground_truth": mean_dicts(truth), "reconstructions": mean_dicts(recon)}


def eval_joint(pipe: MMDLMPipeline, n: int, world: World, sampler: SamplerConfig | None = None,
               batch_size: int = 64, seed: int = 0, progress: bool = True) -> TaskResult:
    """`n` image+caption pairs from nothing: parseable captions, readable images, their agreement (only where the
    world reads scenes from both captions and images: shapes, digits), and the share of distinct captions (a
    sampler that writes one caption every time agrees trivially)."""
    if isinstance(world, CaptionsWorld):
        return TaskResult({"skipped": "joint generation is scored by a world that reads scenes (shapes, digits)",
                           "n": 0})
    cost = Cost(batch_size)
    parsed, readable, agree, captions = [], [], [], []
    examples: list[Example] = []
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    with _progress(n, "joint", progress) as bar:
        for b, k in enumerate(sizes):
            with Timer(pipe.device) as t:
                out = pipe.generate_joint(k, seed=seed + b, sampler=sampler)
            cost.add(out.nfe, t.seconds, k)
            said = [world.read_caption(c) for c in out.captions]
            captions += out.captions
            seen = world.read_images(out.images)
            parsed += [s is not None for s in said]
            readable += [s is not None for s in seen]
            agree += [s is not None and s == v for s, v in zip(said, seen)]
            examples += [Example(img, c) for img, c in zip(out.images, out.captions)][: N_EXAMPLES - len(examples)]
            bar.update(k)
    metrics = {"agreement": rate(agree), "parse_rate": rate(parsed), "image_readable_rate": rate(readable),
               "distinct_captions": len(set(captions)) / max(len(captions), 1), "n": n, "scorer": world.scorer,
               "cost": cost.to_dict(),
               "examples": [e.text for e in examples]}
    return TaskResult(metrics, examples)


@torch.no_grad()
def eval_nll(pipe: MMDLMPipeline, records: Sequence[dict], tasks: Sequence[str] = NLL_TASKS, draws: int = 4,
             batch_size: int = 64, seed: int = 0, progress: bool = True) -> TaskResult:
    """Held-out NLL per target token (MDM: ELBO bound averaged over `draws`; AR: exact), per task too.

    Every record is laid out under every task it can do (`SequenceBuilder(..., seed)`), one task per
    batch, so both models are scored on identical sequences. Image codes come from the pipeline's VQ.
    """
    from mmdlm.blocks import model_blocks
    from mmdlm.diffusion import ar_loss, masked_diffusion_loss
    from mmdlm.sequence import SequenceBuilder, Task, collate

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    exact = pipe.is_autoregressive
    draws = 1 if exact else draws
    generator = torch.Generator(device=pipe.device).manual_seed(seed)

    def nll_sum(batch) -> tuple[float, int]:
        """(NLL summed over the batch's target tokens, their number), averaged over the draws."""
        block = model_blocks(pipe.model.config, batch)  # (B, T) a block model's ELBO: each block given the ones before
        outs = [ar_loss(pipe.model, batch) if exact else
                masked_diffusion_loss(pipe.model, batch, pipe.vocab, generator=generator, block=block)
                for _ in range(draws)]
        return sum(float(o.nll) * o.num_tokens for o in outs) / draws, outs[0].num_tokens

    codes = torch.cat([pipe.encode_images(stack_images(chunk)).cpu() for _, chunk in batches(records, batch_size)])
    rows = [{**r, "codes": c} for r, c in zip(records, codes)]
    task_list = [Task[t.upper()] for t in tasks]
    builder = SequenceBuilder(pipe.vocab, pipe.tokenizer, pipe.layout, dict.fromkeys(task_list, 1.0), seed)
    cost = Cost(batch_size)
    sums: dict[str, list[float]] = {}  # task -> [summed NLL, target tokens, sequences]
    with _progress(len(rows) * len(task_list), "nll", progress) as bar:
        for task in task_list:
            samples = [builder.build(row, task=task) for row in rows if builder.can_do(row, task)]
            acc = sums[task.name.lower()] = [0.0, 0, len(samples)]
            for _, chunk in batches(samples, batch_size):
                batch = collate(chunk, pipe.vocab).to(pipe.device)
                with Timer(pipe.device) as t:
                    total, tokens = nll_sum(batch)
                cost.add(draws, t.seconds, len(chunk))
                acc[0], acc[1] = acc[0] + total, acc[1] + tokens
                bar.update(len(chunk))
    per_task = {k: {"nll": total / max(tokens, 1), "tokens": tokens, "sequences": n}
                for k, (total, tokens, n) in sums.items()}
    all_tokens = sum(v[1] for v in sums.values())
    metrics = {"nll": sum(v[0] for v in sums.values()) / max(all_tokens, 1), "tokens": all_tokens,
               "bound": "exact (AR)" if exact else "ELBO upper bound (MDM)", "draws": draws,
               "per_task": per_task, "truncated": dict(builder.truncated), "cost": cost.to_dict()}
    return TaskResult(metrics)


def eval_edit(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
              batch_size: int = 64, seed: int = 0, progress: bool = True,
              options: Mapping[str, Any] | None = None) -> TaskResult:
    """Image editing: each edit record's source image and instruction (`pipe.edit`), the edited image
    read by the shapes oracle against the edit applied to the source scene (`mmdlm.worlds.edits.check_edit`):
    all-correct (the read scene is exactly the expected one), the edited object right, the rest unchanged; per
    edit kind too. An instruction longer than the model's text region scores 0 (`too_long`). `options`: further
    keyword arguments of `pipe.edit` (`revision=`)."""
    from mmdlm.worlds.edits import Edit, check_edit

    items = documents(records, "edit")
    if not items:
        return TaskResult({"skipped": "no edit records (python -m mmdlm.worlds.edits writes them)", "n": 0})
    usable = [i for i, r in enumerate(items) if _fits(pipe, r["segments"][1]["text"], pipe.layout.text_len)]
    cost = Cost(batch_size)
    checks: dict[int, dict] = {}
    examples: list[Example] = []
    with _progress(len(usable), "edit", progress) as bar:
        for b, chunk in batches(usable, batch_size):
            batch = [items[i] for i in chunk]
            with Timer(pipe.device) as t:
                out = pipe.edit(torch.stack([r["segments"][0]["image"] for r in batch]),
                                [r["segments"][1]["text"] for r in batch], sampler, seed=seed + b, **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            for i, r, image in zip(chunk, batch, out.images):
                checks[i] = check_edit(r["meta"]["before"], Edit.from_dict(r["meta"]["edit"]), image,
                                       pipe.vq.image_size)
            examples += [Example(torch.cat([r["segments"][0]["image"], img], 2), r["segments"][1]["text"])
                         for r, img in zip(batch, out.images)][: N_EXAMPLES - len(examples)]
            bar.update(len(chunk))
    keys = ("all_correct", "edited_ok", "rest_unchanged", "extra_objects", "missing_objects")
    failed = dict.fromkeys(keys, 0.0)
    rows = [{k: float(checks[i][k]) for k in keys} if i in checks else failed for i in range(len(items))]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r, row in zip(items, rows):
        by_kind[r["meta"]["edit"]["kind"]].append(row["all_correct"])
    metrics = {**mean_dicts(rows), "n": len(items), "too_long": len(items) - len(usable),
               "per_kind": {k: {"all_correct": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())},
               "cost": cost.to_dict()}
    return TaskResult(metrics, examples)


def eval_what_changed(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
                      batch_size: int = 64, seed: int = 0, progress: bool = True) -> TaskResult:
    """"What changed?": two images and a question, the answer generated (`pipe.complete_document`);
    exact match after strip/lower, per question type too."""
    from mmdlm.pipeline import Blank

    items = documents(records, "what_changed")
    if not items:
        return TaskResult({"skipped": "no what-changed records (python -m mmdlm.worlds.edits writes them)", "n": 0})
    cost = Cost(batch_size)
    answers: dict[int, str] = {}
    with _progress(len(items), "what_changed", progress) as bar:
        for b, chunk in batches(range(len(items)), batch_size):
            docs = [[*(s["image"] for s in items[i]["segments"][:2]), items[i]["segments"][2]["text"], Blank()]
                    for i in chunk]
            with Timer(pipe.device) as t:
                out = pipe.complete_document(docs, sampler, seed=seed + b)
            cost.add(out.nfe, t.seconds, len(chunk))
            answers.update({i: doc[3] for i, doc in zip(chunk, out.documents)})
            bar.update(len(chunk))
    by_type: dict[str, list[float]] = defaultdict(list)
    for i, r in enumerate(items):
        truth = r["segments"][3]["text"]
        by_type[r["meta"].get("question_type", "unknown")].append(float(normalize(answers[i]) == normalize(truth)))
    scores = [s for v in by_type.values() for s in v]
    shown = [{"question": items[i]["segments"][2]["text"], "predicted": answers[i],
              "answer": items[i]["segments"][3]["text"]} for i in range(min(N_EXAMPLES, len(items)))]
    examples = [Example(torch.cat([s["image"] for s in items[i]["segments"][:2]], 2),
                        f"Q: {d['question']}\npred: {d['predicted']} | true: {d['answer']}")
                for i, d in enumerate(shown)]
    metrics = {"accuracy": sum(scores) / len(scores), "n": len(scores),
               "per_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())},
               "cost": cost.to_dict(), "examples": shown}
    return TaskResult(metrics, examples)


# ---------------------------------------------------------------------------------------------
# the whole evaluation


@dataclass
class _Context:
    pipe: MMDLMPipeline
    records: list[dict]
    world: World
    samplers: Mapping[str, SamplerConfig]
    batch_size: int
    seed: int
    nll_draws: int
    progress: bool


TASKS: dict[str, Callable[[_Context], TaskResult]] = {
    "vqa": lambda c: eval_vqa(c.pipe, c.records, c.samplers["vqa"], c.batch_size, c.seed, c.progress),
    "caption": lambda c: eval_caption(c.pipe, c.records, c.samplers["caption"], c.batch_size, c.seed, c.progress,
                                      c.world),
    "t2i": lambda c: eval_t2i(c.pipe, c.records, c.samplers["t2i"], c.batch_size, c.seed, c.progress, c.world),
    "joint": lambda c: eval_joint(c.pipe, len(c.records), c.world, c.samplers["joint"], c.batch_size, c.seed,
                                  c.progress),
    "nll": lambda c: eval_nll(c.pipe, c.records, NLL_TASKS, c.nll_draws, c.batch_size, c.seed, c.progress),
    "edit": lambda c: eval_edit(c.pipe, c.records, c.samplers["edit"], c.batch_size, c.seed, c.progress),
    "what_changed": lambda c: eval_what_changed(c.pipe, c.records, c.samplers["what_changed"], c.batch_size, c.seed,
                                                c.progress),
}


def run_evaluation(pipe: MMDLMPipeline, shards: str | Sequence[str] | None = None,
                   tasks: Sequence[str] = ALL_TASKS, limit: int | None = None, *,
                   records: list[dict] | None = None, samplers: Mapping[str, SamplerConfig] | None = None,
                   batch_size: int = 64, seed: int = 0, nll_draws: int = 4, progress: bool = True,
                   scorer: str | None = None) -> Evaluation:
    """`evaluate`, also returning the examples for `write_samples`. Give `shards` or loaded `records`;
    `samplers` maps a task (vqa, caption, t2i, joint) to its `SamplerConfig`; a task left out gets the
    pipeline's default."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    if records is None:
        if shards is None:
            raise ValueError("give shards or records")
        records = load_records(shards, pipe.vq.image_size, limit)
    records = records[:limit] if limit is not None else records
    samplers = {task: (samplers or {}).get(task) or pipe.sampler(name) for task, name in PIPELINE_TASK.items()}
    ctx = _Context(pipe, records, world_for(records, pipe.vq.image_size, scorer), samplers, batch_size, seed, nll_draws,
                   progress)
    metrics: dict[str, Any] = {
        "source": ctx.world.source, "records": len(records),
        "model_kind": "ar" if pipe.is_autoregressive else "block" if pipe.model.config.block_diffusion else "mdm",
        "parameters": sum(p.numel() for p in pipe.model.parameters()),
        "device": str(pipe.device),
        "settings": {"tasks": list(tasks), "limit": limit, "batch_size": batch_size, "seed": seed,
                     "nll_draws": nll_draws,
                     "sampler": {t: samplers[t].to_dict() for t in tasks if t in samplers}},
    }
    examples = {}
    for name in tasks:
        with Timer(pipe.device) as t:
            result = TASKS[name](ctx)
        metrics[name] = {**result.metrics, "task_seconds": round(t.seconds, 3)}
        examples[name] = result.examples
    return Evaluation(metrics, examples)


def evaluate(pipe: MMDLMPipeline, shards: str | Sequence[str] | None = None, tasks: Sequence[str] = ALL_TASKS,
             limit: int | None = None, **kw) -> dict:
    """Evaluate a pipeline on val shards; returns the nested metrics dict (see the module docstring).

    Keyword arguments: `records` (already loaded, instead of shards), `samplers` (task -> SamplerConfig),
    `batch_size`, `seed`, `nll_draws`, `progress`.
    """
    return run_evaluation(pipe, shards, tasks, limit, **kw).metrics
