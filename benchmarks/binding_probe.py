"""Does the model bind a colour word to the image tokens it generates? A probe of the text-to-image head.

    python -m benchmarks.binding_probe --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --limit 60 --json /tmp/probe.json

On single-object val scenes of the shapes world, the text-to-image sequence (canonical caption + the true
image codes) is given to the model with some image positions masked, and one forward pass is read:
- `object_masked`: every patch of the object masked, the background visible (the model knows *where*);
- `half_visible`: every other object patch masked (the visible half shows the colour);
- `all_masked`: the whole image masked (plain text-to-image, first step).
For the masked object patches it reports the probability of the true code, the share of predictions
that are background, and the **colour mass on the true colour**: the model's probability summed over the
codes of each colour (a code's colour = the mean of its decoded non-black pixels, snapped to the palette),
renormalised over colours. 1/8 = 0.125 is no colour information at all. `prompt_swap` gives the colour
mass on the *prompt's* colour when the caption's colour word is replaced by another one (object masked):
above 0.125 means the colour word steers the image tokens.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from mmdlm.data import record_pipeline
from mmdlm.inputs import add_device_argument, add_model_argument
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.sequence import t2i_sample
from mmdlm.worlds.shapes import COLORS


def code_colours(vq: torch.nn.Module) -> torch.Tensor:
    """Long[K]: the palette index (mmdlm.worlds.shapes.COLORS order) of each code's decoded patch colour, -1 for
    codes that decode to background only. `vq` is any image tokenizer (`vision.load`)."""
    h, w = vq.grid
    K = vq.codebook_size
    ids = torch.arange(K)[:, None, None].expand(K, h, w)  # (K, h, w): an image of only code k
    images = torch.cat([vq.decode(part).cpu() for part in ids.split(256)])  # (K, 3, H, W)
    f = images.shape[-1] // w
    patch = images[:, :, :f, :f].reshape(K, 3, -1)  # (K, 3, f*f)
    lit = patch.amax(1) > 0.2  # (K, f*f) non-black pixels
    mean = (patch * lit[:, None]).sum(-1) / lit.sum(-1, keepdim=True).clamp_min(1)  # (K, 3)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # (8, 3)
    nearest = torch.cdist(mean, palette).argmin(1)  # (K,)
    return torch.where(lit.any(1), nearest, -1)


@torch.no_grad()
def probe(pipe: MMDLMPipeline, records: list[dict], seed: int = 0) -> dict:
    """The probe's figures over single-object records (see the module docstring)."""
    vocab, layout = pipe.vocab, pipe.layout
    colours = code_colours(pipe.vq).to(pipe.device)  # (K,)
    names = list(COLORS)
    rng = random.Random(seed)
    lo, hi = vocab.image_offset, vocab.image_offset + vocab.codebook_size
    sums: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        sums.setdefault(key, []).append(value)

    def colour_mass(probs: torch.Tensor) -> torch.Tensor:  # (N, K) -> (N, 8) renormalised over colours
        mass = torch.zeros(probs.shape[0], len(names), device=probs.device)
        lit = colours >= 0
        mass.index_add_(1, colours[lit], probs[:, lit])
        return mass / mass.sum(1, keepdim=True).clamp_min(1e-12)

    for record in records:
        obj = record["meta"]["objects"][0]
        caption = record["captions"][0]
        codes = record["codes"]
        for mode in ("object_masked", "half_visible", "all_masked", "prompt_swap"):
            text = caption
            target_colour = names.index(obj["color"])
            if mode == "prompt_swap":
                other = rng.choice([c for c in names if c != obj["color"]])
                text = caption.replace(f" {obj['color']} ", f" {other} ")
                target_colour = names.index(other)
            sample = t2i_sample(pipe._encode_text(text, layout.caption_len, "prompt"), codes, vocab, layout)
            orig = sample.ids.to(pipe.device)  # (T,)
            ids = orig.clone()  # (T,)
            pos = (sample.image_index >= 0).nonzero().flatten().to(pipe.device)  # (N,)
            true = ids[pos] - lo  # (N,)
            on_object = colours[true] >= 0  # (N,)
            if not on_object.any():
                continue
            masked = {"object_masked": pos[on_object], "prompt_swap": pos[on_object],
                      "half_visible": pos[on_object][::2], "all_masked": pos}[mode]
            ids[masked] = vocab.mask
            logits = pipe.model(ids[None], sample.pad[None].to(pipe.device),
                                sample.image_index[None].to(pipe.device))[0]  # (T, V)
            read = pos[on_object] if mode != "half_visible" else pos[on_object][::2]
            want = orig[read] - lo  # (n,) the true codes there
            probs = logits[read][:, lo:hi].float().softmax(-1)  # (n, K)
            add(f"{mode}/p_true_code", float(probs.gather(1, want[:, None]).mean()))
            add(f"{mode}/argmax_background", float((colours[probs.argmax(1)] < 0).float().mean()))
            add(f"{mode}/colour_mass_on_{'prompt' if mode == 'prompt_swap' else 'true'}_colour",
                float(colour_mass(probs)[:, target_colour].mean()))
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())} | {"records": len(records), "chance": 1 / 8}


def main(argv: list[str] | None = None) -> None:
    """Print (and optionally save) the colour-binding probe of a model folder."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.binding_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--shards", required=True, help="pre-tokenized shapes val shards")
    parser.add_argument("--limit", type=int, default=60, help="single-object scenes to probe")
    parser.add_argument("--json", default=None, help="also write the figures here")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    pipe = MMDLMPipeline.from_pretrained(args.model, device=args.device)
    records = []
    for record in record_pipeline(args.shards, pipe.vq.image_size, load_images=False):
        if record.get("codes") is not None and len(record["meta"].get("objects", [])) == 1:
            records.append(record)
        if len(records) >= args.limit:
            break
    if not records:
        parser.exit(2, f"error: no single-object shapes records with codes in {args.shards!r}\n")
    result = {"model": args.model, **probe(pipe, records)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
