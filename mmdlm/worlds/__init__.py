"""The worlds: the datasets mmdlm generates itself and can score exactly, each one's code in one place.

A world is a recipe that writes webdataset shards (images + captions + QA, docs/INTERFACES.md) and the scorer
that reads a generated image back, so text-to-image is measured like VQA (as CLEVR-style worlds are used to
probe compositional generation):

| module | what it is |
| --- | --- |
| `shapes.py` | the shapes world: scene graphs, rendering, captions, `parse_caption`, questions, shard writer |
| `oracle.py` | the shapes world's scorer: reads a scene graph back from pixels (`read_scene`, `score_image`) |
| `edits.py` | the shapes world's editing recipe: scene-graph edits, instructions, what-changed QA, `check_edit` |
| `digits.py` | scikit-learn's bundled handwritten digits (1,797 real scans) as shards with captions and QA |
| `digits_scorer.py` | the digits world's scorer: a k-NN digit classifier, fitted leaving out the scans it scores |
| `scoring.py` | how evaluation and rewards score a source: `World`, its three worlds, `world_for` |

They are installed with mmdlm (evaluation and benchmarks import them at run time); the short recipe commands
`python -m data.shapes` / `python -m data.digits`, run from the repository root beside the shards they write,
are wrappers of `python -m mmdlm.worlds.shapes` / `python -m mmdlm.worlds.digits` (data/README.md).
Nothing is imported here: `import mmdlm.worlds.shapes` loads PIL only, the scorers load torch.
"""
