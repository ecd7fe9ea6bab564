"""The digits recipe, run from the repository root: `python -m data.digits --out DIR [--image-size 32]`.

A wrapper of `python -m mmdlm.worlds.digits` (the same options and output), kept beside the shards it writes;
the code is installed with mmdlm (data/README.md).
"""

from mmdlm.worlds.digits import main

if __name__ == "__main__":
    main()
