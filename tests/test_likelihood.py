"""The log-likelihood estimates a policy gradient is built on: the coupled ELBO estimate's mean is the
exact ELBO (every mask enumerated), gradients flow through it; the AR twin's log-likelihood is the teacher-forced
sum, position by position."""

from __future__ import annotations

import torch

from mmdlm.likelihood import (
    ar_log_likelihood,
    elbo,
    exact_elbo,
    full_mask_log_likelihood,
    trajectory_log_likelihood,
    trajectory_token_log_probs,
)
from mmdlm.model import ModelConfig, Transformer
from mmdlm.sequence import Layout, collate, t2i_sample, text_sample
from mmdlm.vocab import Vocab

VOCAB = Vocab(text_size=24, codebook_size=16)
LAYOUT = Layout(text_len=4)


def tiny(causal: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=16, causal=causal,
                      image_tokens=4, codebook_size=VOCAB.codebook_size, image_offset=VOCAB.image_offset)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper than at init, so the bound differs clearly from sequence to sequence
        model.lm_head.weight.mul_(20)
    return model


def batch():
    return collate([text_sample(ids, VOCAB, LAYOUT) for ids in ([3, 5, 7], [1, 1], [9, 2, 4])], VOCAB)


def test_the_coupled_estimate_is_the_exact_elbo_on_average() -> None:
    model, b = tiny(), batch()
    with torch.no_grad():
        exact = exact_elbo(model, b, VOCAB)  # (3,)
        g = torch.Generator().manual_seed(0)
        draws = torch.stack([elbo(model, b, VOCAB, generator=g) for _ in range(2000)])  # (2000, 3)
    mean, se = draws.mean(0), draws.std(0) / 2000 ** 0.5
    assert bool((exact < 0).all())
    assert bool(((mean - exact).abs() < 4 * se + 1e-3).all()), (mean, exact, se)
    assert len(set(exact.tolist())) == 3  # the rows differ: the check is not of a constant


def test_gradients_flow_through_the_estimate() -> None:
    model = tiny().train()
    value = elbo(model, batch(), VOCAB, draws=2, generator=torch.Generator().manual_seed(1)).sum()
    value.backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_ar_log_likelihood_is_the_teacher_forced_sum() -> None:
    model, b = tiny(causal=True), batch()
    with torch.no_grad():
        got = ar_log_likelihood(model, b)  # (3,)
        logits = model(b.ids, b.pad, b.image_index).log_softmax(-1)  # (B, T, V)
    for row in range(len(b)):
        expected = sum(float(logits[row, i - 1, b.ids[row, i]]) for i in range(1, b.ids.shape[1])
                       if bool(b.target[row, i]) and not bool(b.pad[row, i]))
        assert abs(float(got[row]) - expected) < 1e-4


def test_the_guided_log_likelihood_is_that_of_the_guided_distribution() -> None:
    """What GRPO scores guided rollouts with: log softmax(cond + w (cond - uncond)), the caption dropped as pad."""
    model = tiny()
    b = collate([t2i_sample([3, 5], torch.tensor([[1, 2], [3, 4]]), VOCAB, Layout(caption_len=4))], VOCAB)
    target = b.target & ~b.pad
    with torch.no_grad():
        got = full_mask_log_likelihood(model, b, VOCAB, guidance=2.0)
        plain = full_mask_log_likelihood(model, b, VOCAB)
        noisy = b.ids.masked_fill(target, VOCAB.mask)
        c = model(noisy, b.pad, b.image_index, prefix=b.prefix)[target]  # (4, V)
        u = model(noisy, b.pad | b.cond, b.image_index, prefix=b.prefix)[target]
        expected = (c + 2.0 * (c - u)).log_softmax(-1).gather(1, b.ids[target][:, None]).sum()
        cond_only = c.log_softmax(-1).gather(1, b.ids[target][:, None]).sum()
    assert abs(float(got) - float(expected)) < 1e-4 and abs(float(plain) - float(cond_only)) < 1e-4
    assert abs(float(got) - float(plain)) > 1e-3  # the caption matters to this model: guidance changes the value


def test_the_trajectory_likelihood_is_what_the_sampler_drew_with() -> None:
    """Each token's log p where and when the sampler committed it: the sum of the sampler's own log p(chosen) at
    commit (`MaskedState.p_commit`, temperature 1), with guidance and its plausibility constraint."""
    from mmdlm.sampling import MaskedScheduler, SamplerConfig
    from mmdlm.sequence import t2i_prompt

    model = tiny()
    layout = Layout(caption_len=3)
    b = collate([t2i_prompt(ids, VOCAB, layout, 4) for ids in ([3, 5], [7], [1, 2])], VOCAB)
    scheduler = MaskedScheduler(VOCAB)
    configs = (SamplerConfig(steps=3, temperature=1.0), SamplerConfig(steps=2, temperature=1.0, guidance_scale=2.0))
    for config in configs:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            state = scheduler.set_timesteps(b, config, generator=g)
            history = []
            while not state.done:
                scheduler.step(model(**scheduler.model_inputs(state)), state)
                history.append(state.canvas.clone())
            got = trajectory_log_likelihood(model, b, history, VOCAB, config)  # (3,)
        expected = torch.where(b.target, state.p_commit.log(), 0.0).sum(1).float()  # (3,)
        assert len(history) == config.steps and bool((history[-1][b.target] != VOCAB.mask).all())
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    model.train()
    trajectory_log_likelihood(model, b, history, VOCAB, config).sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_the_importance_ratio_is_that_of_the_two_samplers() -> None:
    """A rollout drawn hot and unconstrained (the explorer), scored under the default-like sampler: each token's
    log ratio is log p_target - log p_explorer, computed apart; -inf where the target's plausibility constraint
    excludes the token; 0 when the two samplers are one."""
    from mmdlm.sampling import MaskedScheduler, SamplerConfig
    from mmdlm.sequence import t2i_prompt

    model = tiny()
    b = collate([t2i_prompt(ids, VOCAB, Layout(caption_len=3), 4) for ids in ([3, 5], [7], [1, 2])], VOCAB)
    target = SamplerConfig(steps=2, temperature=1.0, guidance_scale=2.0, guidance_plausibility=0.3)
    explorer = SamplerConfig(steps=2, temperature=1.5, guidance_scale=2.0, guidance_plausibility=0.0)
    scheduler = MaskedScheduler(VOCAB)
    log_ratio = []
    with torch.no_grad():
        for seed in range(4):  # several rollouts, so some token falls outside the target's constraint
            g = torch.Generator().manual_seed(seed)
            h = scheduler.sample(model, b, explorer, generator=g, history=True).history
            lp, r, lr = trajectory_token_log_probs(model, b, h, VOCAB, target, explorer)  # (M,) each
            lp_explorer, _, none = trajectory_token_log_probs(model, b, h, VOCAB, explorer)
            assert none is None
            finite = torch.isfinite(lr)
            torch.testing.assert_close(lr[finite], (lp - lp_explorer)[finite], atol=1e-4, rtol=1e-4)
            log_ratio.append(lr)
            torch.testing.assert_close(torch.zeros(3).index_add(0, r, lp),
                                       trajectory_log_likelihood(model, b, h, VOCAB, target))
            _, _, same = trajectory_token_log_probs(model, b, h, VOCAB, explorer, explorer)
            torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-5, rtol=0)
    log_ratio = torch.cat(log_ratio)
    assert bool(torch.isinf(log_ratio).any()) and bool(torch.isfinite(log_ratio).any())
