"""Verifiable rewards: the oracle's image reward, exact VQA, caption F1, and a user's own callable."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmdlm.training.rewards import CaptionReward, ImageReward, VQAReward, load_reward
from mmdlm.worlds.shapes import caption, make_object, render, sample_scene


def records(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        objects = sample_scene(rng, 1, 2)
        out.append({"__key__": f"r{i}", "captions": [caption(objects)],
                    "meta": {"source": "shapes", "objects": objects},
                    "qa_asked": {"question": "what color is the circle?", "answer": "Red"}})
    return out


def image(objects: list[dict]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(render(objects)).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


def constant_reward(completions, recs) -> torch.Tensor:  # a user's reward, loaded as module:function
    return torch.full((len(recs),), 0.5)


def test_image_reward_is_the_oracle_all_correct_or_its_partial_credit() -> None:
    recs = records(4)
    right = torch.stack([image(r["meta"]["objects"]) for r in recs])  # (4, 3, H, W)
    assert ImageReward()(right, recs).tolist() == [1.0] * 4
    recoloured = [[{**o, "color": "white" if o["color"] != "white" else "red"} for o in r["meta"]["objects"]]
                  for r in recs]
    wrong = torch.stack([image(objs) for objs in recoloured])
    assert ImageReward()(wrong, recs).tolist() == [0.0] * 4
    partial = ImageReward(partial=True)(wrong, recs)  # the shapes, sizes and cells are still right
    assert bool(((partial > 0.4) & (partial < 1)).all()), partial


def test_vqa_and_caption_rewards() -> None:
    recs = records(2)
    assert VQAReward()([" red", "blue"], recs).tolist() == [1.0, 0.0]
    obj = make_object("red", "circle", "large", 0)
    rec = {"captions": [caption([obj])], "meta": {"source": "shapes", "objects": [obj]}}
    wrong = caption([make_object("blue", "circle", "large", 0)])
    scores = CaptionReward()([caption([obj]), wrong, "nonsense"], [rec] * 3)
    assert scores[0] == 1.0 and 0 < scores[1] < 1 and scores[2] == 0.0


def test_load_reward_by_name_or_module_function() -> None:
    assert isinstance(load_reward("t2i_partial"), ImageReward) and load_reward("t2i_partial").partial
    assert load_reward("tests.test_rewards:constant_reward")(None, [{}, {}]).tolist() == [0.5, 0.5]
    for bad in ("nope", "no.such.module:fn", "tests.test_rewards:missing"):
        with pytest.raises(ValueError, match="reward"):
            load_reward(bad)
