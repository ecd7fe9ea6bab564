"""End to end: a tiny MDM trained by Lightning on webdataset shards learns a toy world, and the
samplers use what it learned (VQA and captioning from the image). Text-to-image learning is checked by
tests/test_sampling.py's toy task (text copied into image codes).

The toy world is laid out directly in VQ codes, so the test needs no trained image tokenizer: an 8x8 code
grid of code 1 + colour with a 2x2 hole of code 0 at one of 9 cells. Captions and QA are
written from the same scene. The model is queried through fresh prompts (one question, an all-masked
caption or image) and must answer from the image, caption it, and draw it; a few (colour, cell)
combinations are never trained on (probe out; generalising to them takes longer than a test may run, so
they are not scored here: the shapes-world evaluation measures generalisation).
"""

from __future__ import annotations

import io
import json
import re

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from mmdlm.model import ModelConfig
from mmdlm.sampling import MaskedScheduler, SamplerConfig
from mmdlm.sequence import Layout, caption_prompt, collate, vqa_prompt
from mmdlm.text_tokenizer import BPETokenizer, texts_of_record
from mmdlm.training import LitMDM, MDMDataModule

COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange"]
CELLS = ["top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right"]
MIN_CELL_ACC = 0.3  # locating the hole is learned later than the colour; 0.3 is well above chance
HELD_OUT = {(c, (3 * c) % 9) for c in range(8)}  # one cell per colour never seen in training


def scene_codes(color: int, cell: int) -> np.ndarray:
    """An 8x8 grid of code 1 + colour with a 2x2 hole of code 0 at the cell (colour is global, the cell local)."""
    codes = np.full((8, 8), 1 + color, dtype=np.int16)
    r, c = 3 * (cell // 3), 3 * (cell % 3)
    codes[r : r + 2, c : c + 2] = 0
    return codes


def record(color: int, cell: int) -> dict:
    return {"captions": [f"a {COLORS[color]} circle at the {CELLS[cell]}"],
            "qa": [{"question": "what color is the circle?", "answer": COLORS[color], "type": "color"},
                   {"question": "where is the circle?", "answer": CELLS[cell], "type": "position"}]}


def write(path, pairs: list[tuple[int, int]], repeat: int) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(repeat):
            for color, cell in pairs:
                buf = io.BytesIO()
                np.save(buf, scene_codes(color, cell))
                sink.write({"__key__": f"s{i:03d}-{color}-{cell}", "npy": buf.getvalue(),
                            "json": json.dumps(record(color, cell)).encode()})


def toy_data(tiny_model_dir, tmp_path) -> MDMDataModule:
    train = [(c, p) for c in range(8) for p in range(9) if (c, p) not in HELD_OUT]
    write(tmp_path / "train.tar", train, repeat=6)
    write(tmp_path / "val.tar", sorted(HELD_OUT), repeat=1)
    texts = [t for c in range(8) for p in range(9) for t in texts_of_record(record(c, p))]
    BPETokenizer.train(texts, vocab_size=400).save(tmp_path / "tok")  # as the quickstart: BPE of its own data
    return MDMDataModule(train_shards=str(tmp_path / "train.tar"), val_shards=str(tmp_path / "val.tar"),
                         text_tokenizer=str(tmp_path / "tok"), vq=f"{tiny_model_dir}/vq",
                         task_weights={"t2i": 1.0, "vqa": 1.0, "caption": 1.0}, batch_size=16, resampled=True,
                         shuffle_buffer=64, seed=0, layout=Layout(question_len=8, answer_len=4))


def fit(dm: MDMDataModule, steps: int, causal: bool = False, **model_args) -> LitMDM:
    L.seed_everything(0)
    module = LitMDM(config=ModelConfig(n_layer=2, n_head=2, n_embd=64, causal=causal), lr=3e-3, warmup_steps=20,
                    ema_decay=0.0, samples_at_val=0, weighting="masked_mean", task_balanced=True, **model_args)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=dm)
    return module


@pytest.mark.slow
def test_tiny_mdm_learns_toy_world_end_to_end(tiny_model_dir, tmp_path) -> None:
    dm = toy_data(tiny_model_dir, tmp_path)
    check_learned(fit(dm, 900), dm)


@pytest.mark.slow
def test_an_ar_warm_start_adapted_to_masked_diffusion_learns_the_toy_world(tiny_model_dir, tmp_path) -> None:
    """The quickstart's recipe at toy scale: the AR twin for half the steps, exported, then adapted to masked
    diffusion (`init_from` an AR folder: bidirectional, `shift_logits`) for the other half; the adapted model
    must pass the same checks, decoded by the masked-diffusion sampler."""
    dm = toy_data(tiny_model_dir, tmp_path)
    fit(dm, 450, causal=True, export_dir=str(tmp_path / "ar"))
    module = fit(dm, 450, init_from=str(tmp_path / "ar"))
    assert not module.model.config.causal and module.model.config.shift_logits
    check_learned(module, dm)


def check_learned(module: LitMDM, dm: MDMDataModule) -> None:
    """The model answers, captions from the image (masked-diffusion sampler, fresh prompts)."""
    model, vocab, layout, tok = module.model.eval(), dm.processor.vocab, dm.processor.layout, dm.processor.tokenizer

    def run(samples):
        batch = collate(samples, vocab)
        return MaskedScheduler(vocab).sample(model, batch, SamplerConfig(steps=8)).ids

    def texts(ids, samples):
        out = []
        for row, s in zip(ids, samples):
            out.append(tok.decode(vocab.text_ids_only(row[: len(s)][s.target])))
        return out

    probe = [(c, (3 * c + 1) % 9) for c in range(8)] + [(c, (5 * c + 2) % 9) for c in range(8)]  # trained on
    codes = [torch.from_numpy(scene_codes(c, p)).long() for c, p in probe]
    colour_q = [vqa_prompt(x, tok.encode("what color is the circle?"), vocab, layout) for x in codes]
    where_q = [vqa_prompt(x, tok.encode("where is the circle?"), vocab, layout) for x in codes]
    colours = texts(run(colour_q), colour_q)
    cells = texts(run(where_q), where_q)
    colour_acc = np.mean([a.strip() == COLORS[c] for a, (c, _) in zip(colours, probe)])
    cell_acc = np.mean([a.strip() == CELLS[p] for a, (_, p) in zip(cells, probe)])
    assert colour_acc >= 0.9, colours  # read from the image (chance: 1/8)
    assert np.mean([a.strip() in CELLS for a in cells]) >= 0.9, cells  # answers of the asked type
    assert cell_acc >= MIN_CELL_ACC, cells  # chance: 1/9

    caps = [caption_prompt(x, vocab, layout) for x in codes]
    captions = texts(run(caps), caps)
    pattern = re.compile(rf"a ({'|'.join(COLORS)}) circle at the ({'|'.join(CELLS)})")
    parsed = [pattern.fullmatch(c.strip()) for c in captions]
    assert np.mean([m is not None for m in parsed]) >= 0.8, captions  # well-formed captions
    assert np.mean([m is not None and m.group(1) == COLORS[c] for m, (c, _) in zip(parsed, probe)]) >= 0.8, captions
