"""Pre-tokenize webdataset shards: add each image's VQ codes as an `npy` member beside the original ones.

    mmdlm pretokenize --vq runs/quickstart/vq --shards 'data/shards/shapes/train/*.tar' \\
        --out data/shards/shapes-codes/train

One output shard per input shard, same names and keys; a sample whose image cannot be read is skipped and
counted; a `DONE` file with the counts is written last (`mmdlm.pretokenize` describes the format).
Exit status 2 with one sentence when no sample could be written or the pattern matches nothing.
"""

from __future__ import annotations

import argparse

from mmdlm.errors import UserError
from mmdlm.inputs import add_device_argument
from mmdlm.pretokenize import pretokenize, skip_summary


def main(argv: list[str] | None = None, prog: str = "mmdlm pretokenize") -> None:
    """Add VQ codes (`npy`, [h, w] int16/int32) to every sample of webdataset shards."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vq", required=True, help="VQ tokenizer folder (diffusers VQModel format)")
    parser.add_argument("--shards", required=True, help="input shards: a glob or brace pattern (quote it)")
    parser.add_argument("--out", required=True, help="output folder; shards keep their names and sub-folders")
    parser.add_argument("--batch-size", type=int, default=256, help="images encoded per forward")
    add_device_argument(parser, default="cpu", help="torch device of the encoder")
    args = parser.parse_args(argv)
    try:
        summary = pretokenize(args.vq, args.shards, args.out, batch_size=args.batch_size, device=args.device)
    except UserError as err:  # includes a shard pattern that matches nothing (mmdlm.data.ShardsNotFound)
        parser.exit(2, f"error: {err}\n")
    print(f"[pretokenize] {summary['written']} samples in {summary['shards']} shards -> {args.out}; "
          f"{skip_summary(summary)}")


if __name__ == "__main__":
    main()
