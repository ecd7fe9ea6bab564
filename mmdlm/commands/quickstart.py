"""Run the whole pipeline end to end on one CPU: data -> text BPE -> image tokenizer -> pre-tokenize -> AR warm
start -> block-diffusion model adapted from it -> evaluation.

    make quickstart                                   # = mmdlm quickstart --out runs/quickstart
    mmdlm quickstart --out runs/quickstart --seed 1   # another draw of the data, the weights and the noise
    mmdlm quickstart --out runs/mdm --adapt mdm       # full-sequence masked diffusion instead of blocks
    mmdlm quickstart --out runs/mdm-only --ar-steps 0 --adapt mdm --mdm-steps 2600   # MDM from scratch
    mmdlm quickstart --world digits --out runs/digits   # scikit-learn's real handwritten digits

Every step is an ordinary command a user could type (printed before it runs, `mmdlm.quickstart`); a step whose
output already exists is skipped, so a killed quickstart picks up where it stopped (a training stage resumes
from its `checkpoints/last.ckpt` through `--ckpt_path last`). Writes `OUT/metrics.json`, `OUT/report.md` and
`OUT/samples.png`.
"""

from __future__ import annotations

import argparse
import time

from mmdlm.quickstart import ADAPTATIONS, TOKENIZER_STEPS, WORLDS, steps


def main(argv: list[str] | None = None, prog: str = "mmdlm quickstart") -> None:
    """Run the whole mmdlm pipeline on the shapes world (or the digits) and write metrics, a report and samples."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder")
    parser.add_argument("--world", choices=sorted(WORLDS), default="shapes",
                        help="data: the procedural shapes world, or scikit-learn's real handwritten digits")
    parser.add_argument("--data", default=None,
                        help="where the shards go (default: data/shards/shapes or data/shards/digits)")
    parser.add_argument("--train", type=int, default=20_000, help="training scenes (shapes)")
    parser.add_argument("--val", type=int, default=1_000, help="held-out scenes (shapes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the training noise")
    parser.add_argument("--text-vocab", type=int, default=512, help="BPE vocab size")
    parser.add_argument("--tokenizer", choices=sorted(TOKENIZER_STEPS), default="patch",
                        help="image tokenizer: a fitted patch dictionary, or the diffusers VQ-VAE (Lightning)")
    parser.add_argument("--codebook-size", type=int, default=None,
                        help="image codes (default: 1024 for shapes, 32 for digits)")
    parser.add_argument("--vq-steps", type=int, default=500, help="VQ-VAE training steps (--tokenizer vq)")
    parser.add_argument("--ar-steps", type=int, default=2600,
                        help="steps of the AR warm start the MDM is adapted from (0: train the MDM from scratch)")
    parser.add_argument("--adapt", choices=sorted(ADAPTATIONS), default="block",
                        help="what the AR warm start becomes: block diffusion (configs/block.yaml) or full-sequence "
                             "masked diffusion")
    parser.add_argument("--mdm-steps", type=int, default=1000,
                        help="diffusion training steps (after the warm start)")
    parser.add_argument("--ar-rows", type=float, default=0.5,
                        help="share of each adaptation batch kept on the AR objective (LitMDM ar_rows; 0 = none)")
    parser.add_argument("--ar-args", default="", help="more train.py arguments for the AR warm start")
    parser.add_argument("--mdm-args", default="",
                        help="more train.py arguments for the MDM, e.g. '--trainer.accelerator gpu'")
    parser.add_argument("--eval-limit", type=int, default=200, help="val samples per evaluated task")
    args = parser.parse_args(argv)
    if args.codebook_size is not None and args.codebook_size < 2:
        parser.error(f"--codebook-size must be at least 2, got {args.codebook_size}")

    start = time.perf_counter()
    timings = {step.name: step.run() for step in steps(args)}
    print(f"\n[quickstart] finished in {(time.perf_counter() - start) / 60:.1f} min")
    for name, seconds in timings.items():
        print(f"  {name:<36s} {seconds / 60:6.1f} min")
    print(f"  -> {args.out}/metrics.json, {args.out}/report.md, {args.out}/samples.png")


if __name__ == "__main__":
    main()
