"""Verifiable rewards for reinforcement learning: a reward reads a task's completions against the
records they were prompted from and returns Float[N] in [0, 1], one value per completion.

The worlds make rewards exact: the shapes oracle reads a generated image back to its scene graph, the digits
classifier reads a digit, VQA answers are exact matches, and a caption's objects are parsed and compared
attribute by attribute. As TRL's GRPO reward functions, a reward is any callable of that shape; `load_reward`
takes a user's own from `module:function`.

    reward = ImageReward()                      # text-to-image: the oracle's all-correct (partial=True: credit)
    reward(images, records)                     # Float[N]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmdlm.eval.metrics import normalize
from mmdlm.worlds.scoring import World, load_callable, world_for

Reward = Callable[[Any, Sequence[dict]], torch.Tensor]
"""(completions, records) -> Float[N]: images Float[N, 3, H, W] in [0, 1] for text-to-image, texts otherwise;
records[i] is the record completion i was prompted from (VQA: with the asked pair under "qa_asked")."""


@dataclass
class ImageReward:
    """Text-to-image: the world's scorer on each generated image. `partial=False`: 1 when the scene is drawn
    exactly (all-correct); True: the mean of the per-attribute scores (credit for a right colour alone), which
    gives a group of completions a spread of rewards sooner."""

    partial: bool = False
    image_size: int | None = None  # the world's scorer needs it for digits; None = the images' own size
    world: World | None = None  # None: from the first records' meta.source (then kept: the digits classifier
    #   is fitted once)

    def __call__(self, images: torch.Tensor, records: Sequence[dict]) -> torch.Tensor:
        if self.world is None:
            self.world = world_for(records, self.image_size or images.shape[-1])
        world = self.world
        scores = world.score_images(images, records)
        if not self.partial:
            return torch.tensor([s["all_correct"] for s in scores])
        keys = [k for k in world.image_keys if k not in ("all_correct", "extra_objects")] or ["all_correct"]
        return torch.tensor([sum(s[k] for k in keys) / len(keys) for s in scores])


@dataclass
class VQAReward:
    """VQA: 1 for the exact answer (after strip/lower, as `mmdlm evaluate` scores it), else 0."""

    def __call__(self, answers: Sequence[str], records: Sequence[dict]) -> torch.Tensor:
        return torch.tensor([float(a.strip().lower() == r["qa_asked"]["answer"].strip().lower())
                             for a, r in zip(answers, records)])


@dataclass
class CaptionReward:
    """Captioning: each caption's F1 against the record's scene, averaged over the attributes (shapes: cell,
    colour, shape, size and the whole object), or exact match where the world parses no captions."""

    world: World | None = None  # None: from the first records' meta.source

    def __call__(self, captions: Sequence[str], records: Sequence[dict]) -> torch.Tensor:
        if self.world is None:
            self.world = world_for(records, 0)
        world = self.world
        out = []
        for text, record in zip(captions, records):
            counts = world.caption_counts(text, record)
            if "tp_object" not in counts:
                out.append(float(normalize(text) == normalize(record["captions"][0])))
                continue
            n_pred, n_true = counts["n_pred"], counts["n_true"]
            tps = [v for k, v in counts.items() if k.startswith("tp_")]
            f1 = [2 * tp / (n_pred + n_true) if n_pred + n_true else 0.0 for tp in tps]
            out.append(sum(f1) / len(f1))
        return torch.tensor(out)


REWARDS: dict[str, Callable[[], Reward]] = {
    "t2i_all_correct": ImageReward,
    "t2i_partial": lambda: ImageReward(partial=True),
    "vqa_exact": VQAReward,
    "caption_f1": CaptionReward,
}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name (`REWARDS`), or a user's callable as `module:function`; ValueError naming what is
    wrong."""
    if spec in REWARDS:
        return REWARDS[spec]()
    if ":" not in spec:
        raise ValueError(f"a reward is one of {', '.join(REWARDS)} or module:function, got {spec!r}")
    return load_callable(spec, "reward")
