"""The shapes recipe, run from the repository root: `python -m data.shapes --out DIR --train N --val M`.

A wrapper of `python -m mmdlm.worlds.shapes` (the same options and output), kept beside the shards it writes;
the code is installed with mmdlm (data/README.md).
"""

from mmdlm.worlds.shapes import main

if __name__ == "__main__":
    main()
