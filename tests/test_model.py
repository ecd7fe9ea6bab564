"""The transformer: causality, pads anywhere, KV cache == full forward, codebook-projected embeddings."""

from dataclasses import replace

import pytest
import torch

from mmdlm.model import ModelConfig, Transformer
from mmdlm.vocab import Vocab

VOCAB = Vocab(text_size=40, codebook_size=16)
GRID = (2, 3)  # 6 image tokens, not square: exercises row = i // w, col = i % w


def make(causal: bool = False, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=64, causal=causal,
                      image_tokens=6, image_grid=GRID, codebook_size=VOCAB.codebook_size,
                      image_offset=VOCAB.image_offset, codebook_dim=4, **kw)
    return Transformer(cfg).eval()


def example(B: int = 3, T: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids with an image at positions 4..9 and a few pads in the middle of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB.text_size, (B, T), generator=g)
    image_index = torch.full((B, T), -1)
    image_index[:, 4:10] = torch.arange(6)
    ids[:, 4:10] = VOCAB.image_to_token(torch.randint(0, 16, (B, 6), generator=g))
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 2:4] = True
    pad[1:, 12:14] = True
    ids[pad] = VOCAB.pad
    return ids, pad, image_index


@pytest.mark.parametrize("causal", [False, True])
def test_forward_shape_finite_and_backward(causal: bool) -> None:
    model = make(causal).train()
    ids, pad, image_index = example()
    logits = model(ids, pad, image_index)
    assert logits.shape == (3, 16, VOCAB.size)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used


def test_causal_cannot_see_the_future_bidirectional_can() -> None:
    ids, pad, image_index = example(B=1)
    changed = ids.clone()
    changed[0, 11] = (ids[0, 11] + 1) % VOCAB.text_size
    for causal in (True, False):
        model = make(causal)
        a, b = model(ids, pad, image_index), model(changed, pad, image_index)
        same_before = torch.allclose(a[0, :11], b[0, :11], atol=1e-6)
        assert same_before == causal
        assert not torch.allclose(a[0, 11:], b[0, 11:], atol=1e-6)  # the position itself and after change


@pytest.mark.parametrize("causal", [False, True])
def test_pads_in_the_middle_equal_removing_them(causal: bool) -> None:
    model = make(causal)
    ids, pad, image_index = example(B=1)
    logits = model(ids, pad, image_index)[0]
    keep = ~pad[0]
    pos = torch.arange(16)[keep][None]  # RoPE positions kept
    removed = model(ids[:, keep], None, image_index[:, keep], pos=pos)[0]
    torch.testing.assert_close(logits[keep], removed, atol=1e-5, rtol=1e-5)
    # whatever sits at a pad position is invisible to the others
    other = ids.clone()
    other[pad] = 3
    torch.testing.assert_close(model(other, pad, image_index)[0][keep], logits[keep])


def test_fully_padded_rows_do_not_produce_nan() -> None:
    for causal in (False, True):
        model = make(causal)
        ids, _, image_index = example(B=2)
        pad = torch.zeros(2, 16, dtype=torch.bool)
        pad[0] = True  # a whole row of pads
        pad[1, 0] = True  # causal: the first query has no non-pad key but itself
        assert torch.isfinite(model(ids, pad, image_index)).all()
        # recent torch returns 0 for an all-masked SDPA row, older releases and some kernels NaN:
        # the mask itself must give every query a key
        mask, _ = model._attention_mask(pad, 0, 16, ids.device, causal)
        assert bool(mask.any(dim=-1).all())


@pytest.mark.parametrize("mask_positions", [False, True])
def test_kv_cache_decoding_equals_full_forward(mask_positions: bool) -> None:
    model = make(causal=True, mask_positions=mask_positions, mask_id=VOCAB.mask)
    ids, pad, image_index = example(B=3, T=16)
    ids[:, [3, 10, 14]] = torch.where(pad[:, [3, 10, 14]], ids[:, [3, 10, 14]], VOCAB.mask)  # positions of masks
    full = model(ids, pad, image_index)
    cache = model.new_cache(3, 20)
    chunks = [(0, 5), (5, 6), (6, 10), *[(i, i + 1) for i in range(10, 16)]]  # a prompt, then token by token
    out = []
    with torch.no_grad():
        for a, b in chunks:
            out.append(model(ids[:, a:b], pad[:, a:b], image_index[:, a:b], cache=cache))
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, pad, image_index, cache=model.new_cache(3, 8))


def test_codebook_projected_embeddings_follow_the_codebook() -> None:
    model = make()
    text_ids = torch.arange(0, VOCAB.text_size)
    image_ids = torch.arange(VOCAB.image_offset, VOCAB.special_offset)
    before = model.embedding_table().detach().clone()
    torch.testing.assert_close(before, model.tok_emb.weight.detach())  # zero codebook: nothing added yet
    codebook = torch.randn(16, 4)
    model.set_codebook(codebook)
    after = model.embedding_table().detach()
    torch.testing.assert_close(after[text_ids], before[text_ids])  # text untouched
    assert (after[image_ids] - before[image_ids]).abs().amax(dim=1).min() > 0  # every image code moved
    # similar codes -> similar embeddings: the code's look is visible from step 1
    model.set_codebook(torch.cat([codebook[:1].repeat(2, 1), codebook[2:]]))
    emb = model.embedding_table().detach()[image_ids] - model.tok_emb.weight.detach()[image_ids]
    torch.testing.assert_close(emb[0], emb[1])
    # a different codebook changes the logits of an image sequence
    ids, pad, image_index = example(B=1)
    a = model(ids, pad, image_index)
    model.set_codebook(torch.randn(16, 4))
    assert not torch.allclose(a, model(ids, pad, image_index))
    # saved with the weights, not trainable
    state = model.state_dict()
    assert "codebook" in state and all(n != "codebook" for n, _ in model.named_parameters())
    fresh = make(seed=5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(ids, pad, image_index), model(ids, pad, image_index))
    with pytest.raises(ValueError, match="codebook must be"):
        model.set_codebook(torch.randn(15, 4))


def test_image_positions_and_modality_matter() -> None:
    model = make()
    ids, pad, image_index = example(B=1)
    a = model(ids, pad, image_index)
    shuffled = image_index.clone()
    shuffled[0, 4:10] = torch.tensor([5, 4, 3, 2, 1, 0])
    assert not torch.allclose(a, model(ids, pad, shuffled), atol=1e-6)  # 2D positions are used
    assert not torch.allclose(a, model(ids, pad, None), atol=1e-6)  # the modality embedding is used
    no_image = torch.full_like(image_index, -1)
    torch.testing.assert_close(model(ids, pad, no_image), model(ids, pad, None))


def test_mask_positions_tell_identical_masked_slots_apart() -> None:
    """A run of identical <mask> tokens gives a bidirectional RoPE-only model identical values at every
    position, so every slot gets the same logits; mask positions break that tie. Clean tokens and image
    slots (which have the 2D embedding) do not see the 1D table."""
    ids = torch.full((1, 12), VOCAB.mask)
    same = make()(ids, None, None)  # (1, 12, V)
    torch.testing.assert_close(same, same[:, :1].expand_as(same), atol=1e-5, rtol=1e-5)
    model = make(mask_positions=True, mask_id=VOCAB.mask)
    logits = model(ids, None, None)  # (1, 12, V)
    assert (logits[0, 1:] - logits[0, :1]).abs().amax(dim=-1).min() > 1e-3  # every slot differs from slot 0
    clean, pad, image_index = example(B=1)
    ids = clean.clone()
    ids[0, 4:13] = VOCAB.mask  # image slots 4..9 and text slots 10..12 masked
    with torch.no_grad():
        a = model(ids, pad, image_index)
        before = model(clean, pad, image_index)
        model.pos_emb.weight[:10].add_(1.0)  # clean text 0..3 and masked image slots 4..9: not used
        torch.testing.assert_close(model(ids, pad, image_index), a)
        torch.testing.assert_close(model(clean, pad, image_index), before)
        model.pos_emb.weight[10:13].add_(1.0)  # the masked text slots: used
        assert not torch.allclose(model(ids, pad, image_index), a, atol=1e-4)
    with pytest.raises(ValueError, match="mask_id"):
        make(mask_positions=True)


def test_config_checks_and_accounting() -> None:
    with pytest.raises(ValueError, match="image_grid"):
        ModelConfig(vocab_size=10, image_tokens=6, image_grid=(2, 2))
    with pytest.raises(ValueError, match="square"):
        ModelConfig(vocab_size=10, image_tokens=6)
    assert ModelConfig(vocab_size=10, image_tokens=16).image_grid == (4, 4)
    assert ModelConfig(vocab_size=10, image_grid=[2, 5]).image_tokens == 10  # either one is enough
    tied, untied = make(tie_head=True), make()
    V, d = VOCAB.size, 32
    assert untied.num_params() - tied.num_params() == V * d
    n_blocks = sum(p.numel() for p in tied.blocks.parameters())
    assert tied.flops_per_token(50) == 6 * (n_blocks + V * d) + 12 * 2 * d * 50
    assert tied.flops_per_token(50) == untied.flops_per_token(50)  # tied or not, the head is one matmul
    assert tied.num_params(non_embedding=True) < tied.num_params()
    with pytest.raises(ValueError, match="max_seq_len"):
        tied(torch.zeros(1, 65, dtype=torch.long))


def test_head_codebook_puts_the_codebook_in_the_image_logits_only() -> None:
    model = make(tie_head=False, head_codebook=True)
    model.set_codebook(torch.randn(VOCAB.codebook_size, 4))
    ids, pad, image_index = example()
    before = model(ids, pad, image_index)
    # the same hidden states, scored by a head without the projection: only image columns differ
    hidden = model.embedding_table()  # any (V, C) rows will do as "hidden states" for the head
    plain = hidden @ model.lm_head.weight.T  # (V, V)
    with_codes = hidden @ model.head_table(model.embedding_table()).T  # (V, V)
    lo, hi = VOCAB.image_offset, VOCAB.image_offset + VOCAB.codebook_size
    torch.testing.assert_close(with_codes[:, :lo], plain[:, :lo])
    torch.testing.assert_close(with_codes[:, hi:], plain[:, hi:])
    assert not torch.allclose(with_codes[:, lo:hi], plain[:, lo:hi])
    with torch.no_grad():  # the projection is one module: zeroing it removes it from input and head alike
        model.code_proj.weight.zero_()
    assert not torch.allclose(before, model(ids, pad, image_index))
    torch.testing.assert_close(model.head_table(model.embedding_table()), model.lm_head.weight)
    with pytest.raises(ValueError, match="untied head"):
        make(tie_head=True, head_codebook=True)
    with pytest.raises(ValueError, match="codebook projection"):
        ModelConfig(vocab_size=VOCAB.size, tie_head=False, head_codebook=True)


def test_logits_at_scores_only_the_chosen_positions() -> None:
    """`logits_at` gives exactly the full forward's logits at those positions (the training loss's path)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, max_seq_len=16)).eval()
    ids = torch.randint(0, 50, (3, 12))
    where = torch.rand(3, 12) < 0.4
    full = model(ids)  # (3, 12, 50)
    torch.testing.assert_close(model(ids, logits_at=where), full[where])


def test_shift_logits_reads_the_previous_hidden_state_and_causal_calls_are_unshifted() -> None:
    """`shift_logits`: a bidirectional call scores position i from the hidden state at i - 1 (Dream); a
    `causal=True` call of the same weights is exactly the AR model's forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, max_seq_len=16)
    plain = Transformer(cfg).eval()
    shifted = Transformer(replace(cfg, shift_logits=True)).eval()
    shifted.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(shifted(ids)[:, 1:], plain(ids)[:, :-1])
    torch.testing.assert_close(shifted(ids)[:, 0], plain(ids)[:, 0])
    causal = Transformer(replace(cfg, causal=True)).eval()
    causal.load_state_dict(plain.state_dict())
    torch.testing.assert_close(shifted(ids, causal=True), causal(ids))


def test_inference_keeps_the_tables_until_a_weight_they_come_from_changes() -> None:
    """Without autograd the embedding / head tables are cached; every way weights change in this project
    (an optimizer step, an EMA-style copy into the state_dict, load_state_dict, set_codebook) refreshes them."""
    model = make(tie_head=False, head_codebook=True)
    model.set_codebook(torch.randn(VOCAB.codebook_size, 4))
    ids, pad, image_index = example()

    def fresh() -> torch.Tensor:  # the uncached path: autograd on
        with torch.enable_grad():
            return model(ids, pad, image_index).detach()

    with torch.no_grad():
        first = model(ids, pad, image_index)
        assert model._tables is not None and torch.equal(first, fresh())
        cached = model._tables[1]
        assert model(ids, pad, image_index) is not None and model._tables[1] is cached  # reused
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.train()
    model(ids, pad, image_index).sum().backward()
    opt.step()
    model.eval()
    changes = [
        lambda: None,  # the optimizer step above
        lambda: model.state_dict()["tok_emb.weight"].copy_(torch.randn_like(model.tok_emb.weight)),  # EMA swap
        lambda: model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()}),
        lambda: model.set_codebook(torch.randn(VOCAB.codebook_size, 4)),
        lambda: model.state_dict()["code_proj.weight"].mul_(2.0),
    ]
    for change in changes:
        with torch.no_grad():
            change()
            out = model(ids, pad, image_index)
        assert torch.equal(out, fresh()), change


def test_grouped_query_heads_explicit_sizes_and_biases_decode_as_the_full_forward() -> None:
    """n_kv_head, head_size, attn_bias and mlp_hidden_size (what imported causal LMs need): the shapes they name,
    a KV cache of the key/value heads only, cached decoding equal to the full forward."""
    model = make(causal=True, n_kv_head=1, head_size=24, attn_bias=True, mlp_hidden_size=40)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((2 + 2 * 1) * 24, 32) and attn.qkv.bias.shape == (96,)
    assert attn.proj.weight.shape == (32, 2 * 24) and attn.proj.bias is None
    assert model.blocks[0].mlp.fc.weight.shape == (80, 32)
    torch.nn.init.normal_(attn.qkv.bias)  # built at zero: make them count
    ids, pad, image_index = example(B=3, T=16)
    full = model(ids, pad, image_index)
    cache = model.new_cache(3, 20)
    assert cache.k[0].shape == (3, 1, 20, 24)
    with torch.no_grad():
        out = [model(ids[:, a:b], pad[:, a:b], image_index[:, a:b], cache=cache)
               for a, b in [(0, 6), *[(i, i + 1) for i in range(6, 16)]]]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert ModelConfig(n_embd=30, n_head=4, head_size=8).head_dim == 8  # 30 / 4 is no head size: none is needed


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_gradients(dropout: float) -> None:
    grads = []
    for checkpointing in (False, True):
        model = make(dropout=dropout).train()
        model.activation_checkpointing = checkpointing
        ids, pad, image_index = example()
        torch.manual_seed(5)  # the same dropout masks (checkpoint replays the RNG state in the recompute)
        model(ids, pad, image_index).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-7, rtol=1e-6, msg=name)
