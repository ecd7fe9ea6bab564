"""mmdlm: multimodal masked-diffusion language models. One bidirectional transformer over text tokens and image
codes in one vocabulary, trained with Lightning on webdataset shards, sampled by diffusers-style schedulers,
with an autoregressive twin on the same backbone for side-by-side measurement.

Where things live: docs/ARCHITECTURE.md. The user-facing entry points: `mmdlm.pipeline.MMDLMPipeline`
(`from_pretrained(DIR)`, one method per task), `mmdlm.sampling.SamplerConfig`, the `mmdlm` command
(`mmdlm --help`), `python train.py fit --config configs/...yaml`. Nothing is imported here, so
`import mmdlm.worlds.shapes` (or a command's `--help`) does not load torch.
"""
