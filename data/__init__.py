"""The dataset recipes' folder (not installed): `python -m data.shapes` / `python -m data.digits` from the
repository root are wrappers of `mmdlm.worlds`; the shards they write go to data/shards/ (data/README.md)."""
