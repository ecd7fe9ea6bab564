"""`mmdlm export --format transformers`: the folder loads through `AutoModel` / `AutoProcessor` in a fresh interpreter
that cannot import mmdlm (nor vision), its logits are the Transformer's and its `sample` gives `MMDLMPipeline`'s
tokens for the same seed (a masked-diffusion, a block-diffusion and an AR model); the remote code is the project's
modules made flat, with no project import left, every file reachable by transformers' loader and nothing but the
folder's required packages imported at module level; the command's errors are one sentence and exit 2.

    python -m pytest -q tests/test_hf_export.py
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdlm import commands as cli
from mmdlm.folder import read_config, write_model_folder
from mmdlm.hf_export import (
    ENTRY,
    REQUIRED,
    BundleError,
    bundle_sources,
    bundled_imports,
    export_transformers,
    flat_name,
    rewrite_module,
)
from mmdlm.hf_remote import MMDLMModel
from mmdlm.model import Transformer
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.sequence import caption_sample, collate, t2i_prompt

KINDS = {"masked": {}, "block": {"shift_logits": True, "block_diffusion": True, "block_size": 4, "image_block_rows": 2},
         "ar": {"causal": True}}
PROMPTS = ["a large red circle at the top left", "a small blue square"]

# Run in a fresh interpreter whose import system refuses mmdlm and vision: loads each exported folder with the auto
# classes, computes logits on the given batch, captions the given images and draws the prompts' images.
FRESH = r'''
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mmdlm", "vision"):
            raise ImportError(f"{name} must not be imported by an exported folder")

sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoModel, AutoProcessor

inputs = torch.load(sys.argv[1])
results = {}
for kind, folder in inputs["folders"].items():
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    batch = inputs["batch"][kind]
    with torch.no_grad():
        logits = model(batch["ids"], attention_mask=batch["attention_mask"], image_index=batch["image_index"]).logits
    caption = model.sample(processor, "caption", inputs["images"], seed=3)
    drawn = model.sample(processor, "text_to_image", inputs["prompts"], seed=4)
    results[kind] = {"logits": logits, "caption_ids": caption.ids, "captions": caption.texts, "codes": drawn.codes,
                     "rope": (model.transformer.rope_cos, model.transformer.rope_sin),
                     "classes": (type(model).__module__, type(model).__name__, type(processor).__name__)}
results["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("mmdlm", "vision"))
torch.save(results, sys.argv[2])
'''


def model_folder(tiny_model_dir: str, root: Path, kind: str) -> Path:
    """The tiny folder's weights as a masked, block-diffusion or AR model folder (untrained: sampling is compared,
    not judged)."""
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    model = Transformer(replace(pipe.model.config, **KINDS[kind]))
    model.load_state_dict(pipe.model.state_dict())
    return write_model_folder(model, pipe.processor, root / kind)


def fixed_batch(pipe: MMDLMPipeline) -> dict[str, torch.Tensor]:
    """A caption sample and a masked text-to-image prompt, padded to one length: ids, attention_mask, image_index."""
    codes = torch.arange(pipe.vq.tokens_per_image).view(pipe.vq.grid) % pipe.vocab.codebook_size  # (h, w)
    ids = pipe.processor.encode_text(PROMPTS[0])
    batch = collate([caption_sample(codes, ids, pipe.vocab, pipe.layout),
                     t2i_prompt(ids, pipe.vocab, pipe.layout, pipe.vq.tokens_per_image)], pipe.vocab)
    return {"ids": batch.ids, "attention_mask": (~batch.pad).long(), "image_index": batch.image_index}


@pytest.fixture(scope="module")
def exported(tiny_model_dir: str, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{kind: (mmdlm folder, its transformers export)}."""
    root = tmp_path_factory.mktemp("hf_export")
    out = {}
    for kind in KINDS:
        folder = model_folder(tiny_model_dir, root / "mmdlm", kind)
        out[kind] = folder, export_transformers(folder, root / "hf" / kind)
    return out


@pytest.fixture(scope="module")
def fresh(exported, tmp_path_factory) -> tuple[dict, dict]:
    """(what the fresh interpreter computed, its inputs)."""
    root = tmp_path_factory.mktemp("fresh")
    pipes = {kind: MMDLMPipeline.from_pretrained(folder, device="cpu") for kind, (folder, _) in exported.items()}
    size = pipes["masked"].vq.image_size
    inputs = {"folders": {kind: str(hf) for kind, (_, hf) in exported.items()},
              "batch": {kind: fixed_batch(pipe) for kind, pipe in pipes.items()},
              "images": torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
              "prompts": PROMPTS}
    torch.save(inputs, root / "inputs.pt")
    (root / "fresh.py").write_text(FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(root / "fresh.py"), str(root / "inputs.pt"), str(root / "out.pt")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(root / "out.pt"), {**inputs, "pipes": pipes}


# ---- the folder in a fresh interpreter ---------------------------------------------------------------------
def test_the_auto_classes_load_the_folder_without_mmdlm(fresh) -> None:
    results, _ = fresh
    assert results["project_modules"] == []  # refused by the finder, and none came in any other way
    for kind in KINDS:
        module, model_class, processor_class = results[kind]["classes"]
        assert module.startswith("transformers_modules.") and module.endswith(flat_name(ENTRY))
        assert (model_class, processor_class) == ("MMDLMModel", "MMDLMProcessor")


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_are_the_transformers(fresh, kind: str) -> None:
    results, inputs = fresh
    pipe, batch = inputs["pipes"][kind], inputs["batch"][kind]
    with torch.no_grad():
        expected = pipe.model(batch["ids"], batch["attention_mask"] == 0, batch["image_index"])  # (B, T, V)
    torch.testing.assert_close(results[kind]["logits"], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rope_tables_are_recomputed_after_meta_device_loading(fresh, kind: str) -> None:
    results, inputs = fresh
    model = inputs["pipes"][kind].model
    cos, sin = results[kind]["rope"]
    assert torch.equal(cos, model.rope_cos) and torch.equal(sin, model.rope_sin)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sample_gives_the_pipelines_tokens(fresh, kind: str) -> None:
    results, inputs = fresh
    pipe = inputs["pipes"][kind]
    caption = pipe.caption(inputs["images"], seed=3)
    assert torch.equal(results[kind]["caption_ids"], caption.ids) and results[kind]["captions"] == caption.texts
    assert torch.equal(results[kind]["codes"], pipe.text_to_image(inputs["prompts"], seed=4).codes)


# ---- the folder's files, in this process -------------------------------------------------------------------
def test_the_folder_holds_the_weights_config_and_auto_maps(exported) -> None:
    folder, hf = exported["masked"]
    config, weights = json.loads((hf / "config.json").read_text()), load_file(str(hf / "model.safetensors"))
    recorded = read_config(folder)
    assert config["model_type"] == "mmdlm" and config["model"] == recorded["model"]
    assert (config["vocab"], config["layout"]) == (recorded["vocab"], recorded["layout"])
    stem = flat_name(ENTRY)
    assert config["auto_map"]["AutoModel"] == f"{stem}.MMDLMModel" and (hf / f"{stem}.py").is_file()
    processor_map = json.loads((hf / "processor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoProcessor": f"{stem}.MMDLMProcessor"}
    source = load_file(str(folder / "model.safetensors"))
    assert {k.removeprefix("transformer."): v for k, v in weights.items()}.keys() == source.keys()
    assert all(torch.equal(weights[f"transformer.{k}"], v) for k, v in source.items())
    assert (hf / "text_tokenizer").is_dir() and (hf / "vq" / "config.json").is_file()


def test_the_wrapper_loads_in_process_too(exported) -> None:
    folder, hf = exported["ar"]
    model = MMDLMModel.from_pretrained(hf)
    cos, sin = model.transformer.rope_buffers()
    assert torch.equal(model.transformer.rope_cos, cos) and torch.equal(model.transformer.rope_sin, sin)
    assert asdict(model.transformer.config) == asdict(MMDLMPipeline.from_pretrained(folder, device="cpu").model.config)


def test_sample_refuses_an_unknown_task(exported) -> None:
    model = MMDLMModel.from_pretrained(exported["masked"][1])
    with pytest.raises(ValueError, match="unknown task 'draw'"):
        model.sample(None, "draw")


# ---- the bundle ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle() -> dict[str, str]:
    return bundle_sources()


def test_the_bundle_is_the_import_closure_and_imports_no_project_package(bundle) -> None:
    expected = {"mmdlm_hf_remote", "mmdlm_model", "mmdlm_pipeline", "mmdlm_processor", "mmdlm_sequence",
                "mmdlm_vocab", "mmdlm_sampling", "mmdlm_sampling_block", "mmdlm_sampling_masked",
                "mmdlm_sampling_autoregressive", "mmdlm_text_tokenizer", "vision_load", "vision_tokenizer"}
    assert expected <= {name.removesuffix(".py") for name in bundle}
    assert not {"mmdlm_data.py", "mmdlm_training.py", "vision_lightning.py"} & bundle.keys()  # cut / not imported
    for name, source in bundle.items():
        compile(source, name, "exec")
        assert not [m for m in bundled_imports(source) if m.split(".")[0] in ("mmdlm", "vision")], name
        assert 'import_module(f"mmdlm.' not in source, name
    assert "raise ImportError('not bundled with this model: " in bundle["mmdlm_text_tokenizer.py"]


def test_transformers_loader_finds_every_file_and_needs_only_the_required_packages(bundle, tmp_path: Path) -> None:
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    for name, source in bundle.items():
        (tmp_path / name).write_text(source)
    reached = {Path(f).name for f in get_relative_import_files(tmp_path / f"{flat_name(ENTRY)}.py")}
    assert reached | {f"{flat_name(ENTRY)}.py"} == set(bundle)
    for name in bundle:  # what `check_imports` demands of each file of a Hub repository
        needed = set(get_imports(tmp_path / name)) - set(sys.stdlib_module_names)
        assert needed <= REQUIRED, (name, needed - REQUIRED)


def test_each_import_form_is_rewritten_flat() -> None:
    source = ("import mmdlm.sampling.block as blk\n"
              "from mmdlm.sampling import block, SamplerConfig\n"
              "from mmdlm import vocab as v\n"
              "from mmdlm.sequence import (\n    Layout,\n    collate,\n)\n"
              "\n\ndef f():\n    from mmdlm.vocab import Vocab\n    import open_clip\n    return Vocab, open_clip\n")
    out, imported = rewrite_module("mmdlm.example", source)
    assert out.splitlines()[:4] == ["from . import mmdlm_sampling_block as blk",
                                    "from .mmdlm_sampling import SamplerConfig",
                                    "from . import mmdlm_sampling_block as block",
                                    "from . import mmdlm_vocab as v"]
    assert "from .mmdlm_sequence import (\n    Layout,\n    collate,\n)\n" in out  # the statement's layout kept
    assert "\n    from .mmdlm_vocab import Vocab\n    try:" in out and "except ImportError:\n        raise\n" in out
    assert imported == ["mmdlm.sampling.block", "mmdlm.sampling", "mmdlm.vocab", "mmdlm.sequence"]
    assert not [m for m in bundled_imports(out) if m.startswith("mmdlm")]
    ast.parse(out)
    relative, _ = rewrite_module("mmdlm.sampling.example", "from .config import SamplerConfig\nfrom . import tokens\n")
    assert relative.splitlines() == ["from .mmdlm_sampling_config import SamplerConfig",
                                     "from . import mmdlm_sampling_tokens as tokens"]


@pytest.mark.parametrize("source, message", [("import mmdlm.vocab\n", "binds the package name"),
                                             ("import webdataset\n", "module-level import of webdataset")])
def test_an_import_the_folder_could_not_load_stops_the_export(source: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        rewrite_module("mmdlm.example", source)


# ---- the command --------------------------------------------------------------------------------------------
def test_the_command_exports_a_model_folder_and_a_checkpoint(tiny_model_dir: str, tmp_path: Path, capsys) -> None:
    assert cli.main(["export", "--format", "transformers", "--model", tiny_model_dir, "--out",
                     str(tmp_path / "from-folder")]) == 0
    config, weights = read_config(tiny_model_dir), load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    meta = {"model_config": config["model"], "vocab": config["vocab"], "layout": config["layout"],
            "text_tokenizer": str(Path(tiny_model_dir) / "text_tokenizer"), "vq": str(Path(tiny_model_dir) / "vq")}
    torch.save({"mmdlm": meta, "state_dict": {f"model.{k}": v for k, v in weights.items()}}, tmp_path / "run.ckpt")
    assert cli.main(["export", "--format", "transformers", "--ckpt", str(tmp_path / "run.ckpt"), "--out",
                     str(tmp_path / "from-ckpt")]) == 0
    for out in ("from-folder", "from-ckpt"):
        exported = load_file(str(tmp_path / out / "model.safetensors"))
        assert all(torch.equal(exported[f"transformer.{k}"], v) for k, v in weights.items()), out
    assert "(transformers format)" in capsys.readouterr().out
    assert cli.main(["export", "--model", tiny_model_dir, "--out", str(tmp_path / "copy")]) == 0  # the mmdlm format
    assert read_config(tmp_path / "copy")["weights_sha256"] == config["weights_sha256"]


@pytest.mark.parametrize("case", ["both", "neither", "not a model folder", "a transformers folder", "no-ema"])
def test_bad_inputs_are_one_sentence_and_exit_2(case: str, tiny_model_dir: str, exported, tmp_path: Path,
                                                capsys) -> None:
    out = ["--out", str(tmp_path / "out"), "--format", "transformers"]
    args = {"both": ["--ckpt", str(tmp_path / "x.ckpt"), "--model", tiny_model_dir],
            "neither": [],
            "not a model folder": ["--model", str(tmp_path)],
            "a transformers folder": ["--model", str(exported["masked"][1])],
            "no-ema": ["--model", tiny_model_dir, "--no-ema"]}[case]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", *args, *out])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
