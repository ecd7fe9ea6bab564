"""Evaluation of an mmdlm model on held-out shards: VQA, captioning, text-to-image, joint generation, NLL, and the
edits world's image editing and "what changed?". `mmdlm evaluate` (`mmdlm.commands.evaluate`) is its command.

| module | what it is |
| --- | --- |
| `tasks.py` | one `eval_*` function per task, `TASKS`, `run_evaluation` / `evaluate` (the whole evaluation) |
| `metrics.py` | the arithmetic: `normalize`, `prf`, `cider`, `mean_dicts`, `rate` |
| `records.py` | `load_records` (val records, images decoded), `stack_images`, `documents`, `batches` |
| `report.py` | `render_report` (report.md), `write_samples` (samples.png), `jsonable`, `md_table`, `command_line` |
| `timing.py` | CUDA-synchronised clocks (`Timer`, `timed`), `stats`, `machine_info` |
| `models.py` | `load_models` / `load_pair`: the model folders of a side-by-side measurement, kinds checked |
| `curves.py` | learning curves: `headline` numbers of a metrics dict, the targets, `plot` |

The world (shapes or digits) is read from the records' `meta["source"]` (`mmdlm.worlds.scoring.world_for`);
records of any other source (a user's own captioned shards, img2dataset's layout) are evaluated as plain
captioned images (`CaptionsWorld`): held-out NLL, VQA where records carry `qa`, captions against their
references (exact match, BLEU-4, CIDEr-D), and text-to-image only with a scorer the user plugs in (`--scorer
module:function`, see `mmdlm.worlds.scoring.load_scorer`). Every metric is computed on the first `--limit` val
records in shard order (all records without it), so two models evaluated with the same arguments see the same
inputs. The masked-diffusion model and its causal AR twin go through the same code: only the sampler behind
`MMDLMPipeline` and the NLL (a bound vs exact) differ.

Metrics (`metrics.json`, one section per task; rates are in [0, 1]):
- vqa: exact match of the answer after strip/lower, overall and per question type (`qa[i]["type"]`).
  A question longer than the model's question region cannot be asked: it counts as wrong (`too_long`).
- caption: exact match with the canonical caption (`captions[0]`, case/space/final period ignored),
  BLEU-4 (torchmetrics) against all of the record's captions, and for the shapes world per-attribute
  precision / recall / F1 of the objects the caption describes (see `ShapesWorld.caption_counts`).
- t2i: the prompt is the canonical caption; the generated image is read back by the world's scorer
  (shapes: `mmdlm.worlds.oracle.score_image`, GenEval-style: `all_correct` = exactly the described objects
  with the right colour/shape/size/cell and nothing else, per-attribute rates over the described
  objects, and `extra_objects`, the mean count of objects drawn in empty cells; digits: a k-NN
  classifier, `mmdlm.worlds.digits_scorer`). The same scorer on the ground-truth val images and on their
  VQ reconstructions decode(encode(x)) gives the scorer's accuracy and the ceiling text-to-image can
  reach through this tokenizer.
- joint: n image+caption samples from nothing: the share of captions that parse, and of samples whose
  caption describes exactly the scene the scorer reads in the image (`agreement`).
- nll: held-out NLL per target token over the same sequences for both models: every val record laid
  out under every task of `NLL_TASKS` by `SequenceBuilder` (same seed). MDM: the ELBO bound of
  `masked_diffusion_loss` averaged over `nll_draws` draws of (t, mask); AR: the exact NLL of `ar_loss`.
- edit, what_changed (the edits world's documents): the edited image read by the oracle against the edited
  scene; the answer to "what changed?" by exact match.
- every task: `cost`, the forward passes per sampler call (NFE), the calls, and seconds per sample
  at the stated batch size (model time only; scoring excluded).

Python: `evaluate(pipe, shards, tasks, limit, ...) -> dict`; the per-task functions (`eval_vqa`,
`eval_caption`, `eval_t2i`, `eval_scorer`, `eval_joint`, `eval_nll`, `eval_edit`, `eval_what_changed`) take a
pipeline, records and a `SamplerConfig` (None = the pipeline's default for the task), so a benchmark can sweep
steps / threshold / guidance. The names below load their module on first use (PEP 562), so importing
`mmdlm.eval.metrics` or `mmdlm.eval.report` alone loads neither torch nor the worlds.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ALL_TASKS": "tasks", "NLL_TASKS": "tasks", "PIPELINE_TASK": "tasks", "TASKS": "tasks",
    "Cost": "tasks", "Evaluation": "tasks", "Example": "tasks", "TaskResult": "tasks",
    "eval_caption": "tasks", "eval_edit": "tasks", "eval_joint": "tasks", "eval_nll": "tasks",
    "eval_scorer": "tasks", "eval_t2i": "tasks", "eval_vqa": "tasks", "eval_what_changed": "tasks",
    "evaluate": "tasks", "run_evaluation": "tasks",
    "cider": "metrics", "mean_dicts": "metrics", "normalize": "metrics", "prf": "metrics",
    "load_records": "records", "stack_images": "records",
    "jsonable": "report", "render_report": "report", "write_samples": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdlm.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmdlm.eval.{_EXPORTS[name]}"), name)
