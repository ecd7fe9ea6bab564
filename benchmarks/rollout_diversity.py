"""How much a GRPO group can teach: for train prompts, G rollouts each under a sampler setting, how many distinct
images a group holds and how many groups' rewards differ (the only groups with a non-zero advantage).

    python -m benchmarks.rollout_diversity --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/train/*.tar' --prompts 16 --group 8 \\
        --setting '{}' --setting '{"temperature": 2.0}' --setting '{"guidance_scale": 0.0}'

A `--setting` is a JSON object of `SamplerConfig` fields over the text-to-image default. Prints one JSON line per
setting: the mean reward (the oracle's all-correct), the informative groups, and a histogram of (distinct images,
rewards differ) over the groups.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from mmdlm.errors import UserError
from mmdlm.inputs import add_model_argument


def main(argv: list[str] | None = None) -> None:
    """Measure rollout diversity per GRPO group."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout_diversity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--shards", required=True, help="prompt shards (train: what RL sees)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (groups)")
    parser.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--reward", default="t2i_all_correct", help="a reward name or module:function")
    parser.add_argument("--setting", type=json.loads, action="append", required=True,
                        help="JSON object of SamplerConfig fields, e.g. '{\"temperature\": 2.0}'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from mmdlm.sequence import collate
    from mmdlm.training.grpo import LitGRPO, PromptData

    try:
        data = PromptData(args.shards, limit=args.prompts, prompts_per_step=args.prompts)
        data.setup()
        for setting in args.setting:
            module = LitGRPO(args.model, reward=args.reward, group_size=args.group, sampler=setting)
            samples, records = module.prompts(data.items[: args.prompts])
            batch = collate(samples, module.processor.vocab)
            generator = torch.Generator().manual_seed(args.seed)
            out = module.scheduler.sample(module.model.eval(), batch, module.config, generator=generator)
            rewards = module.reward(module.completions(out.ids, samples), records).float().view(-1, args.group)
            images = out.ids[:, batch.target[0]].view(rewards.shape[0], args.group, -1)  # (P, G, N)
            kinds = Counter((len({tuple(row.tolist()) for row in group}), bool(r.std() > 0))
                            for group, r in zip(images, rewards))
            print(json.dumps({"setting": setting, "mean_reward": round(float(rewards.mean()), 4),
                              "informative_groups": sum(n for (_, differ), n in kinds.items() if differ),
                              "groups": rewards.shape[0],
                              "distinct_images_and_rewards_differ": {f"{d},{int(f)}": n for (d, f), n
                                                                     in sorted(kinds.items())}}), flush=True)
    except (UserError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
