"""transformers causal LMs in: a local Llama, Qwen2 or Qwen3 folder as the weights of mmdlm's `Transformer`.

A folder `save_pretrained` wrote (config.json + model.safetensors, or shards named by model.safetensors.index.json)
is read with safetensors alone, and mapped exactly: mmdlm's causal call on text ids gives the transformers model's
logits. What mmdlm adds to a causal LM is set so that it changes nothing at text positions:

    embed_tokens          -> tok_emb rows [0, text_size); the new rows (image codes, specials) drawn from
                             N(mean, std) of those rows, per dimension (transformers' resize_token_embeddings
                             also starts added rows at the old rows' mean); rows beyond the tokenizer (configs
                             often pad vocab_size) are dropped
    lm_head               -> lm_head the same way (tie_word_embeddings: tie_head, one table)
    input_layernorm       -> norm1           post_attention_layernorm -> norm2       model.norm -> norm
    q_proj, k_proj, v_proj -> attn.qkv (one matmul, biases too: Qwen2); o_proj -> attn.proj
    q_norm, k_norm        -> attn.q_norm, attn.k_norm (Qwen3; qk_norm off for Llama and Qwen2)
    gate_proj, up_proj    -> mlp.fc (gate first: `SwiGLU.forward` chunks it so); down_proj -> mlp.proj
    (new)                 -> modality_emb zeros; row / col image embeddings and the codebook projection as built
                             (they only touch image positions)

RoPE: transformers rotates dims (i, i + D/2) of a head (rotate_half), mmdlm pairs (2i, 2i+1) as Meta's reference
does (`mmdlm.model.apply_rope`); the rows of q and k (weights, biases, q/k-norm weights) are reordered per head,
mmdlm dim 2i <- dim i, 2i+1 <- dim i + D/2, so the rotated dot products are the same numbers.

`LitMDM.init_from_folder` (`--model.init_from DIR`) builds from it; the data's text tokenizer must be the
folder's tokenizer.json (`--data.text_tokenizer DIR`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmdlm.errors import UserError
from mmdlm.model import ROPE_SCALING, ModelConfig, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints: {"weight_map": {name: shard file}}
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_THETA = 10000.0  # transformers' RoPE base when a config names none


@dataclass(frozen=True)
class Family:
    """What a transformers model type fixes that its config.json does not say."""

    qkv_bias: bool  # q, k and v always have biases (Qwen2); else `attention_bias`, which biases o_proj too
    qk_norm: bool  # RMSNorm on each head's q and k (Qwen3)
    head_dim: int  # when config.json names none; 0 = hidden_size // num_attention_heads


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=False, qk_norm=False, head_dim=0),
    "qwen2": Family(qkv_bias=True, qk_norm=False, head_dim=0),
    "qwen3": Family(qkv_bias=False, qk_norm=True, head_dim=128),
}
# the keys each RoPE type reads (transformers' rope validation); llama3's original length defaults to the model's
ROPE_KEYS: dict[str, tuple[str, ...]] = {
    "default": (), "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def read_json(path: Path) -> Any:
    """A json file's contents; None when it is absent or not json."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_transformers_folder(path: str | Path) -> bool:
    """Whether `path` is a transformers model folder: a config.json with a `model_type`, and not an mmdlm model
    folder's (which holds 'model' and 'vocab', `mmdlm.folder.read_config`)."""
    config = read_json(Path(path) / CONFIG_FILE)
    return isinstance(config, dict) and "model_type" in config and "model" not in config and "vocab" not in config


def rope_fields(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_base, rope_scaling) of a config.json: transformers 5's `rope_parameters`, or the `rope_theta` and
    `rope_scaling` of transformers 4; UserError for a RoPE type `ROPE_SCALING` does not hold."""
    params = hf.get("rope_parameters")
    if params is None:
        params = {"rope_theta": hf.get("rope_theta"), **(hf.get("rope_scaling") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{where} gives RoPE parameters per layer type, which mmdlm cannot load (one RoPE for all "
                        "layers)")
    params = dict(params)
    base = float(params.pop("rope_theta", None) or hf.get("rope_theta") or DEFAULT_THETA)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_SCALING:
        raise UserError(f"{where} uses RoPE type {kind!r}, which mmdlm cannot load (it loads "
                        f"{', '.join(ROPE_SCALING)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{where} rotates part of each head (partial_rotary_factor "
                        f"{params['partial_rotary_factor']}), which mmdlm cannot load")
    if kind == "default":
        return base, None
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [key for key in ROPE_KEYS[kind] if params.get(key) is None]
    if missing:
        raise UserError(f"{where} names RoPE type {kind!r} without {', '.join(missing)}")
    return base, {"rope_type": kind, **{k: v for k, v in params.items() if k != "partial_rotary_factor"}}


def model_fields(hf: dict[str, Any], where: str = CONFIG_FILE) -> dict[str, Any]:
    """The `ModelConfig` architecture fields of a transformers config.json (a causal model: `causal=True`);
    UserError naming what mmdlm cannot load exactly. The run-time fields (vocabulary, lengths, image grid) come
    from the data."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise UserError(f"{where} is a transformers {kind!r} model; mmdlm loads model_type "
                        f"{', '.join(FAMILIES)}")
    family = FAMILIES[kind]
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where} has hidden_act {hf['hidden_act']!r}; mmdlm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias", False):
        raise UserError(f"{where} has mlp_bias true; mmdlm's MLP has no biases")
    if not family.qkv_bias and hf.get("attention_bias", False):
        raise UserError(f"{where} has attention_bias true, which biases o_proj too; mmdlm's attention output "
                        "projection has no bias")
    if hf.get("use_sliding_window", False) or any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise UserError(f"{where} turns on sliding-window attention; mmdlm attends to the whole sequence")
    try:
        heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
        layers, mlp = int(hf["num_hidden_layers"]), int(hf["intermediate_size"])
    except KeyError as err:
        raise UserError(f"{where} has no {err.args[0]!r}") from None
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or family.head_dim or hidden // heads)
    base, scaling = rope_fields(hf, where)
    return dict(
        n_layer=layers, n_head=heads, n_embd=hidden, causal=True, qk_norm=family.qk_norm,
        tie_head=bool(hf.get("tie_word_embeddings", False)), head_codebook=False, dropout=0.0, mask_positions=False,
        shift_logits=False, rope_base=base, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        n_kv_head=0 if kv_heads == heads else kv_heads, attn_bias=family.qkv_bias, mlp_hidden_size=mlp,
        head_size=0 if hidden % heads == 0 and head_dim == hidden // heads else head_dim)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors, or of the shards its model.safetensors.index.json names."""
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / INDEX_FILE).is_file():
        index = read_json(folder / INDEX_FILE)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise UserError(f"{str(folder / INDEX_FILE)!r} is not a safetensors index (no 'weight_map')")
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        raise UserError(f"{str(folder)!r} has no {WEIGHTS_FILE} or {INDEX_FILE} (mmdlm reads safetensors "
                        "checkpoints: save the model with save_pretrained)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (OSError, SafetensorError) as err:
            raise UserError(f"{str(file)!r} cannot be read as safetensors: {err}") from err
    return state


def read_causal_lm(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path | None]:
    """(ModelConfig fields, state dict in transformers' names, its tokenizer.json or None) of a transformers
    causal-LM folder; UserError naming what cannot be loaded."""
    folder = Path(folder)
    hf = read_json(folder / CONFIG_FILE)
    if not isinstance(hf, dict):
        raise UserError(f"{str(folder)!r} has no readable {CONFIG_FILE}")
    fields = model_fields(hf, repr(str(folder / CONFIG_FILE)))
    tokenizer = folder / TOKENIZER_FILE
    return fields, read_weights(folder), tokenizer if tokenizer.is_file() else None


def rope_order(head_dim: int) -> torch.Tensor:
    """Long[D]: which transformers dim each mmdlm dim of a head takes: 2i <- i, 2i+1 <- i + D/2."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)  # (D,)


def per_head(rows: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    """The rows of a q or k projection (Float[heads*D, ...] weight or Float[heads*D] bias) reordered within each
    head by `order` (`rope_order`)."""
    return rows.reshape(heads, len(order), *rows.shape[1:])[:, order].reshape(rows.shape)


def grown(rows: torch.Tensor, text_size: int, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Float[size, C]: the first `text_size` rows of an embedding or head, then new rows drawn from N(mean, std)
    of those rows, per dimension."""
    kept = rows[:text_size].float()  # (text_size, C)
    mean, std = kept.mean(0), kept.std(0, correction=0)  # (C,) each
    new = torch.randn(size - text_size, kept.shape[1], generator=generator) * std + mean  # (size - text_size, C)
    return torch.cat([kept, new])


def transformer_state(hf: dict[str, torch.Tensor], config: ModelConfig, text_size: int,
                      codebook: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of a `Transformer(config)` holding a transformers causal LM's weights (`hf`, from
    `read_causal_lm`; `config` from its fields and the data's run-time ones): text ids [0, text_size) are the
    checkpoint's first rows, the parameters it has no counterpart of are a freshly built model's (with
    `codebook` set, `Transformer.set_codebook`), `modality_emb` zeros. UserError when the tokenizer has more ids
    than the checkpoint's embedding, or a weight is missing or left over."""
    hf = dict(hf)
    hf.pop("model.rotary_emb.inv_freq", None)  # a buffer older checkpoints saved; recomputed from the config

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"the checkpoint has no {name!r}")
        return hf.pop(name).float()

    model = Transformer(config)
    if codebook is not None:
        model.set_codebook(codebook)
    state = dict(model.state_dict())
    shapes = {name: value.shape for name, value in state.items()}
    embed = take("model.embed_tokens.weight")  # (V_hf, C)
    if text_size > embed.shape[0]:
        raise UserError(f"the text tokenizer has {text_size} ids but the checkpoint embeds only {embed.shape[0]}")
    state["tok_emb.weight"] = grown(embed, text_size, config.vocab_size, generator)
    head = hf.pop("lm_head.weight", None)
    if not config.tie_head:
        if head is None:
            raise UserError("the checkpoint has no 'lm_head.weight' and does not tie it to the embedding "
                            "(tie_word_embeddings)")
        state["lm_head.weight"] = grown(head.float(), text_size, config.vocab_size, generator)
    state["modality_emb.weight"] = torch.zeros_like(state["modality_emb.weight"])
    state["norm.weight"] = take("model.norm.weight")
    order = rope_order(config.head_dim)
    H, KV = config.n_head, config.kv_heads
    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        a = src + "self_attn."
        state[dst + "norm1.weight"] = take(src + "input_layernorm.weight")
        state[dst + "norm2.weight"] = take(src + "post_attention_layernorm.weight")
        for part in ("weight", "bias") if config.attn_bias else ("weight",):
            q, k = take(f"{a}q_proj.{part}"), take(f"{a}k_proj.{part}")  # (H*D, ...), (KV*D, ...)
            v = take(f"{a}v_proj.{part}")  # (KV*D, ...)
            state[f"{dst}attn.qkv.{part}"] = torch.cat([per_head(q, H, order), per_head(k, KV, order), v])
        state[dst + "attn.proj.weight"] = take(a + "o_proj.weight")
        if config.qk_norm:
            state[dst + "attn.q_norm.weight"] = take(a + "q_norm.weight")[order]
            state[dst + "attn.k_norm.weight"] = take(a + "k_norm.weight")[order]
        m = src + "mlp."
        state[dst + "mlp.fc.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
        state[dst + "mlp.proj.weight"] = take(m + "down_proj.weight")
    if hf:
        raise UserError(f"the checkpoint holds weights mmdlm has no place for: {', '.join(sorted(hf)[:5])}")
    for name, value in state.items():
        if value.shape != shapes[name]:
            raise UserError(f"the checkpoint's weights for {name} are {tuple(value.shape)}, its config.json makes "
                            f"them {tuple(shapes[name])}")
    return state
