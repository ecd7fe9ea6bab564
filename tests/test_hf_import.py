"""transformers causal LMs in (`mmdlm.hf_import`): Llama, Qwen2 and Qwen3 folders give mmdlm's Transformer the same
logits as transformers, sharded or not; what cannot be loaded exactly is refused in one sentence; `--model.init_from`
a causal-LM folder builds the masked-diffusion adaptation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from conftest import HF_FAMILIES, shapes_texts, tiny_hf_causal_lm

from mmdlm.errors import UserError
from mmdlm.hf_import import is_transformers_folder, model_fields, read_causal_lm, transformer_state
from mmdlm.model import ModelConfig, Transformer, rope_tables
from mmdlm.text_tokenizer import BPETokenizer
from mmdlm.vocab import Vocab

CODES = 16  # image codes of the joint vocabulary the imported models are built for


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(shapes_texts(), vocab_size=300)


@pytest.fixture(scope="module")
def folders(tokenizer, tmp_path_factory) -> dict:
    """family -> a saved tiny causal LM of it (the Llama one in shards)."""
    root = tmp_path_factory.mktemp("hf")
    return {family: tiny_hf_causal_lm(root / family, family, tokenizer, shards="100KB" if family == "llama" else None)
            for family in HF_FAMILIES}


def imported(folder, text_size: int, seed: int = 0) -> Transformer:
    """The mmdlm Transformer of a causal-LM folder, over text + CODES image codes, with a codebook projection."""
    fields, weights, _ = read_causal_lm(folder)
    vocab = Vocab(text_size, CODES)
    config = ModelConfig(**fields, vocab_size=vocab.size, max_seq_len=64, mask_id=vocab.mask, image_grid=(4, 4),
                         codebook_size=CODES, image_offset=vocab.image_offset, codebook_dim=8)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.load_state_dict(transformer_state(weights, config, text_size, codebook=torch.randn(CODES, 8)))
    return model.eval()


def transformers_logits(folder, family: str, ids: torch.Tensor) -> torch.Tensor:
    model = getattr(transformers, HF_FAMILIES[family][1]).from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits  # (B, T, V_hf)


def text_ids(tokenizer: BPETokenizer, T: int = 24) -> torch.Tensor:
    rows = [tokenizer.encode(" ".join(shapes_texts(8, seed=s)))[:T] for s in (1, 2)]
    return torch.tensor(rows)  # (2, T)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_imported_causal_logits_equal_transformers(family: str, folders, tokenizer) -> None:
    folder, text_size = folders[family], tokenizer.vocab_size
    assert is_transformers_folder(folder)
    model = imported(folder, text_size)
    ids = text_ids(tokenizer)
    want = transformers_logits(folder, family, ids)[..., :text_size]  # (2, T, text_size)
    with torch.no_grad():
        got = model(ids, causal=True)  # (2, T, V)
        text_only = model(ids, image_index=torch.full_like(ids, -1), causal=True)  # the modality embedding adds 0
    torch.testing.assert_close(got[..., :text_size], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_only, got, atol=0, rtol=0)
    # the KV cache (key/value heads only) decodes the same, token by token after a prompt
    cache = model.new_cache(2, 32)
    assert cache.k[0].shape[1] == 2  # GQA: 2 key/value heads for 4 query heads
    with torch.no_grad():
        steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(8, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), got, atol=1e-5, rtol=1e-5)


def test_the_three_families_set_what_sets_them_apart(folders) -> None:
    llama, qwen2, qwen3 = (read_causal_lm(folders[f])[0] for f in ("llama", "qwen2", "qwen3"))
    assert (llama["tie_head"], llama["rope_base"], llama["rope_scaling"]["rope_type"]) == (False, 500000.0, "llama3")
    assert (qwen2["attn_bias"], qwen2["tie_head"], qwen2["qk_norm"]) == (True, True, False)
    assert (qwen3["qk_norm"], qwen3["head_size"], qwen3["attn_bias"]) == (True, 32, False)
    assert all(f["n_kv_head"] == 2 and f["causal"] and f["mlp_hidden_size"] == 96 for f in (llama, qwen2, qwen3))
    assert llama["head_size"] == qwen2["head_size"] == 0  # 64 / 4: the default


def test_a_sharded_checkpoint_loads_as_the_whole_one(folders, tokenizer, tmp_path) -> None:
    sharded = folders["llama"]
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    whole = tiny_hf_causal_lm(tmp_path / "whole", "llama", tokenizer)  # the same seed: the same weights
    a, b = read_causal_lm(sharded)[1], read_causal_lm(whole)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rope_scalings_match_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scalings = {"linear": {"rope_type": "linear", "factor": 4.0},
                "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}}
    for name, scaling in scalings.items():
        config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0,
                                          rope_scaling=dict(scaling))
        inv_freq, _ = ROPE_INIT_FUNCTIONS[name](config)
        cos, sin = rope_tables(128, 32, 500000.0, scaling)
        angles = torch.outer(torch.arange(128).float(), inv_freq)
        assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin()), name
        assert not torch.equal(cos, rope_tables(128, 32, 500000.0)[0])  # the scaling changes something


def test_transformers_4_configs_read_as_transformers_5_ones(folders) -> None:
    config = json.loads((folders["llama"] / "config.json").read_text())
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    params = dict(config["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = {"type": params.pop("rope_type"), **params}  # transformers 4 also said "type"
    assert model_fields(old) == model_fields(config)


def test_what_cannot_be_loaded_exactly_is_refused_in_one_sentence(folders, tokenizer, tmp_path) -> None:
    base = json.loads((folders["qwen2"] / "config.json").read_text())
    llama = json.loads((folders["llama"] / "config.json").read_text())
    cases = {
        "'gpt2' model": base | {"model_type": "gpt2"},
        "hidden_act 'gelu'": base | {"hidden_act": "gelu"},
        "mlp_bias true": llama | {"mlp_bias": True},
        "biases o_proj": llama | {"attention_bias": True},
        "sliding-window": base | {"use_sliding_window": True, "sliding_window": 16},
        "RoPE type 'yarn'": base | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
        "RoPE type 'dynamic'": base | {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
    }
    for message, config in cases.items():
        with pytest.raises(UserError, match=message):
            model_fields(config)
    # through the folder: a refused config, and a tokenizer with more ids than the checkpoint embeds
    bad = tmp_path / "bad"
    shutil.copytree(folders["qwen3"], bad)
    (bad / "config.json").write_text(json.dumps(cases["hidden_act 'gelu'"] | {"model_type": "qwen3"}))
    with pytest.raises(UserError, match="hidden_act"):
        read_causal_lm(bad)
    fields, weights, _ = read_causal_lm(folders["qwen3"])
    too_many = tokenizer.vocab_size + 1
    config = ModelConfig(**fields, vocab_size=Vocab(too_many, CODES).size, max_seq_len=32)
    with pytest.raises(UserError, match=f"tokenizer has {too_many} ids but the checkpoint embeds only 300"):
        transformer_state(weights, config, too_many)
    with pytest.raises(UserError, match="no 'model.norm.weight'"):
        transformer_state({k: v for k, v in weights.items() if k != "model.norm.weight"}, config, 300)
    (bad / "config.json").write_text((folders["qwen3"] / "config.json").read_text())
    (bad / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors or model.safetensors.index.json"):
        read_causal_lm(bad)


def test_a_padded_vocabulary_keeps_the_tokenizer_rows_and_new_rows_follow_their_statistics(folders, tokenizer) -> None:
    fields, weights, _ = read_causal_lm(folders["qwen2"])  # 312 rows for a 300-id tokenizer, tied
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape[0] == tokenizer.vocab_size + 12
    vocab = Vocab(tokenizer.vocab_size, 1024)
    config = ModelConfig(**fields, vocab_size=vocab.size, max_seq_len=32)
    state = transformer_state(weights, config, vocab.text_size, generator=torch.Generator().manual_seed(0))
    table = state["tok_emb.weight"]  # (V, C)
    assert torch.equal(table[:300], embed[:300]) and "lm_head.weight" not in state
    new = table[300:]  # image codes and specials
    torch.testing.assert_close(new.mean(0), embed[:300].mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(new.std(0), embed[:300].std(0), atol=0.01, rtol=0.2)
    assert torch.equal(state["modality_emb.weight"], torch.zeros_like(state["modality_emb.weight"]))


def test_the_text_tokenizer_adds_no_special_tokens_of_its_own(tokenizer, tmp_path) -> None:
    """A transformers tokenizer.json often has a post-processor that adds <bos> (Llama 3's): mmdlm's encode does
    not run it, so text ids are the text's own."""
    from tokenizers import AddedToken, processors

    tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    inner = BPETokenizer.from_file(tmp_path).tok  # a copy to change
    inner.add_special_tokens([AddedToken("<|begin_of_text|>", special=True)])
    bos = inner.token_to_id("<|begin_of_text|>")
    inner.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                         special_tokens=[("<|begin_of_text|>", bos)])
    with_bos = BPETokenizer(inner)
    assert inner.encode("a red circle").ids[0] == bos  # the post-processor's own behaviour
    assert with_bos.encode("a red circle") == tokenizer.encode("a red circle")


def test_init_from_a_causal_lm_folder_builds_its_masked_diffusion_adaptation(folders, tokenizer, tiny_model_dir,
                                                                              tmp_path) -> None:
    from mmdlm.processor import MMDLMProcessor
    from mmdlm.training.module import LitMDM

    folder = folders["qwen2"]
    data = MMDLMProcessor.from_paths(folder, f"{tiny_model_dir}/vq")  # the folder's own tokenizer.json
    torch.manual_seed(0)
    module = LitMDM(config=ModelConfig(n_layer=4), init_from=str(folder))  # the folder's architecture wins
    module.init_from_folder(folder, data)
    config = module.model.config
    assert (config.causal, config.shift_logits, config.n_layer, config.n_kv_head, config.attn_bias) == (
        False, True, 2, 2, True)
    assert config.vocab_size == data.vocab.size and config.max_seq_len == data.max_seq_len
    assert config.codebook_dim > 0 and config.image_grid == data.image_grid
    assert module.hparams["config"]["shift_logits"] and module.ema is not None
    ids = text_ids(tokenizer)
    with torch.no_grad():
        got = module.model.eval()(ids, causal=True)[..., : tokenizer.vocab_size]
    torch.testing.assert_close(got, transformers_logits(folder, "qwen2", ids)[..., :300], atol=1e-4, rtol=1e-4)

    blocks = LitMDM(config=ModelConfig(block_diffusion=True, block_size=4, image_block_rows=2), init_from=str(folder))
    blocks.init_from_folder(folder, data)
    assert blocks.model.config.block_diffusion and blocks.model.config.block_size == 4

    other = BPETokenizer.train(shapes_texts(300, seed=7) + ["zebra quokka"] * 50, vocab_size=300)
    other.save(tmp_path / "other")
    with pytest.raises(UserError, match=f"--data.text_tokenizer {folder}"):
        LitMDM(init_from=str(folder)).init_from_folder(folder, MMDLMProcessor.from_paths(tmp_path / "other",
                                                                                         f"{tiny_model_dir}/vq"))
    assert not is_transformers_folder(tiny_model_dir) and not is_transformers_folder(tmp_path)
