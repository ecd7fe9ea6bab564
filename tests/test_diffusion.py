"""Masked diffusion: stratified t, forward masking, the ELBO weighting by hand, CFG dropout, the AR loss,
and that a tiny model learns (loss falls; 8 sequences are memorised)."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmdlm.diffusion import (
    COSINE,
    LINEAR,
    ar_loss,
    cond_dropout,
    forward_mask,
    masked_diffusion_loss,
    sample_t,
)
from mmdlm.model import ModelConfig, Transformer
from mmdlm.sequence import Layout, Task, caption_sample, collate, t2i_sample, text_sample, vqa_sample
from mmdlm.vocab import Vocab

V = Vocab(text_size=30, codebook_size=8)
L = Layout(caption_len=5, question_len=3, answer_len=3, text_len=8, qa_per_sample=2)
CODES = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]])  # N = 9


def small_batch():
    return collate([t2i_sample([1, 2], CODES, V, L), caption_sample(CODES, [3, 4, 5], V, L),
                    vqa_sample(CODES, [([6], [7]), ([8, 9], [10])], V, L), text_sample([11, 12], V, L)], V)


class FixedLogits(nn.Module):
    """Returns fixed logits whatever the input, and remembers the input it saw."""

    def __init__(self, logits: torch.Tensor, causal: bool) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.config = SimpleNamespace(causal=causal)
        self.seen: torch.Tensor | None = None

    def forward(self, ids, pad=None, image_index=None, logits_at=None, prefix=None):
        self.seen = ids.clone()
        return self.logits if logits_at is None else self.logits[logits_at]


def log_prob(logits: torch.Tensor, b: int, i: int, token: int) -> float:
    row = logits.detach()[b, i].double()
    return float(row[token] - row.logsumexp(0))


def test_sample_t_is_stratified_over_eps_to_1() -> None:
    eps, B = 1e-3, 64
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = sample_t(B, eps, g)
        assert t.shape == (B,) and float(t.min()) >= eps and float(t.max()) < 1.0
        strata = ((t - eps) / (1 - eps) * B).floor().long()
        assert sorted(strata.tolist()) == list(range(B))  # exactly one t per stratum of width (1-eps)/B
    assert not torch.equal(t, t.sort().values)  # shuffled: t does not follow the batch order
    lows = torch.stack([sample_t(4, eps, g).min() for _ in range(200)])
    assert float(lows.min()) < eps + 0.01  # the lowest stratum reaches down to eps


def test_forward_mask_touches_only_targets_and_masks_at_rate_t() -> None:
    batch = small_batch()
    g = torch.Generator().manual_seed(0)
    for tv in (1e-3, 0.3, 0.7, 1.0):
        t = torch.full((len(batch),), tv)
        noisy, masked = forward_mask(batch, t, V, g)
        assert not (masked & ~batch.target).any() and not (masked & batch.pad).any()
        assert torch.equal(noisy[masked], torch.full_like(noisy[masked], V.mask))
        assert torch.equal(noisy[~masked], batch.ids[~masked])
        assert bool(masked.any(dim=1).all())  # at least one per sequence, even at t = eps
        if tv == 1.0:
            assert torch.equal(masked, batch.target)
    # a row without targets stays untouched; the rate matches t on a long row
    long = collate([text_sample(list(range(8)), V, Layout(text_len=4000))], V)
    long.target[0, 2000:] = False
    noisy, masked = forward_mask(long, torch.tensor([0.3]), V, g)
    assert abs(masked[0, :2000].float().mean().item() - 0.3) < 0.04 and not masked[0, 2000:].any()
    none = collate([text_sample([1], V, L)], V)
    none.target[:] = False
    assert not forward_mask(none, torch.tensor([0.9]), V, g)[1].any()


def test_image_schedule_is_cosine_for_maskgit() -> None:
    t = torch.tensor([0.2, 0.5])
    torch.testing.assert_close(COSINE.mask_prob(t), torch.sin(math.pi * t / 2))
    torch.testing.assert_close(LINEAR.weight(t), 1 / t)
    # the ELBO weight is -alpha'/(1 - alpha); check it numerically for the cosine schedule
    h = 1e-4
    alpha = lambda s: 1 - COSINE.mask_prob(s)  # noqa: E731
    numeric = -(alpha(t + h) - alpha(t - h)) / (2 * h) / (1 - alpha(t))
    torch.testing.assert_close(COSINE.weight(t), numeric, atol=1e-3, rtol=1e-3)
    batch = collate([t2i_sample([1], CODES, V, L)] * 400, V)
    _, masked = forward_mask(batch, torch.full((400,), 0.3), V, torch.Generator().manual_seed(1), COSINE)
    rate = masked[:, batch.image_index[0] >= 0].float().mean().item()
    assert abs(rate - math.sin(0.3 * math.pi / 2)) < 0.03


def test_elbo_weighting_matches_a_hand_computation() -> None:
    batch = small_batch()
    B, T = batch.ids.shape
    model = FixedLogits(torch.randn(B, T, V.size, generator=torch.Generator().manual_seed(0)), causal=False)
    t = torch.tensor([0.3, 0.8, 0.5, 0.4])
    out = masked_diffusion_loss(model, batch, V, t=t, generator=torch.Generator().manual_seed(2))
    assert bool(((model.seen == V.mask).sum(dim=1) >= 2).all())  # so no token was forced (see below)
    n_target = int(batch.target.sum())
    total, per_task = 0.0, {}
    for b in range(B):
        seq = 0.0
        for i in range(T):
            if model.seen[b, i] == V.mask:
                assert batch.target[b, i]
                seq += -log_prob(model.logits, b, i, int(batch.ids[b, i])) / float(t[b])
        total += seq
        per_task[int(batch.task[b])] = seq / int(batch.target[b].sum())
    assert out.num_tokens == n_target
    assert out.loss.item() == pytest.approx(total / n_target, rel=1e-5)
    assert out.nll.item() == pytest.approx(total / n_target, rel=1e-5)
    assert out.per_task.keys() == per_task.keys()
    for k, v in per_task.items():
        assert out.per_task[k].item() == pytest.approx(v, rel=1e-5)
    out.loss.backward()
    assert model.logits.grad is not None


def test_forced_tokens_get_weight_one() -> None:
    """At t -> 0 no token is drawn; the one forced token per sequence counts with weight 1, not 1/t."""
    batch = small_batch()
    B, T = batch.ids.shape
    model = FixedLogits(torch.randn(B, T, V.size, generator=torch.Generator().manual_seed(0)), causal=False)
    out = masked_diffusion_loss(model, batch, V, t=torch.full((B,), 1e-9))
    seen = model.seen == V.mask
    assert seen.sum(dim=1).tolist() == [1] * B and not (seen & ~batch.target).any()
    total = sum(-log_prob(model.logits, b, i, int(batch.ids[b, i])) for b, i in seen.nonzero().tolist())
    assert out.loss.item() == pytest.approx(total / int(batch.target.sum()), rel=1e-5)


def test_maskgit_image_loss_is_unweighted_mean_ce() -> None:
    batch = collate([t2i_sample([1, 2], CODES, V, L), caption_sample(CODES, [3], V, L)], V)
    B, T = batch.ids.shape
    model = FixedLogits(torch.randn(B, T, V.size, generator=torch.Generator().manual_seed(0)), causal=False)
    t = torch.tensor([0.4, 0.6])
    out = masked_diffusion_loss(model, batch, V, t=t, image_schedule="maskgit",
                                generator=torch.Generator().manual_seed(3))
    assert bool(((model.seen == V.mask).sum(dim=1) >= 2).all())  # no forced token
    image_ce, text_sum, elbo = [], 0.0, 0.0
    for b in range(B):
        for i in range(T):
            if model.seen[b, i] != V.mask:
                continue
            ce = -log_prob(model.logits, b, i, int(batch.ids[b, i]))
            if batch.image_index[b, i] >= 0:
                image_ce.append(ce)
                elbo += ce * float(COSINE.weight(t[b]))
            else:
                text_sum += ce / float(t[b])
                elbo += ce / float(t[b])
    n_target, n_image_target = int(batch.target.sum()), int((batch.target & (batch.image_index >= 0)).sum())
    expected = (text_sum + n_image_target * sum(image_ce) / len(image_ce)) / n_target
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.nll.item() == pytest.approx(elbo / n_target, rel=1e-5)


def test_cond_dropout_pads_the_condition_of_chosen_sequences() -> None:
    batch = collate([t2i_sample([1, 2, 3], CODES, V, L)] * 2000, V)
    assert torch.equal(cond_dropout(batch, 0.0).pad, batch.pad)
    dropped = cond_dropout(batch, 1.0)
    assert torch.equal(dropped.pad, batch.pad | batch.cond) and bool(dropped.pad[:, 1:4].all())
    some = cond_dropout(batch, 0.1, torch.Generator().manual_seed(0))
    rows = (some.pad != batch.pad).any(dim=1).float().mean().item()
    assert 0.07 < rows < 0.13
    assert torch.equal(some.target, batch.target) and torch.equal(some.ids, batch.ids)


def test_ar_loss_is_next_token_nll_on_targets() -> None:
    batch = small_batch()
    B, T = batch.ids.shape
    model = FixedLogits(torch.randn(B, T, V.size, generator=torch.Generator().manual_seed(0)), causal=True)
    out = ar_loss(model, batch)
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T - 1):
            if batch.target[b, i + 1]:
                total -= log_prob(model.logits, b, i, int(batch.ids[b, i + 1]))
                n += 1
    assert n == int(batch.target.sum()) == out.num_tokens  # no template has a target at position 0
    assert out.loss.item() == pytest.approx(total / n, rel=1e-5)
    assert set(out.per_task) == {Task.T2I, Task.CAPTION, Task.VQA, Task.TEXT}
    with pytest.raises(ValueError, match="causal"):
        ar_loss(Transformer(ModelConfig(vocab_size=V.size, n_layer=1, n_embd=16, n_head=2)), batch)
    balanced = ar_loss(model, batch, task_balanced=True)  # each task's mean CE, averaged over the tasks
    per_task = {task: [] for task in out.per_task}
    for b in range(B):
        for i in range(T - 1):
            if batch.target[b, i + 1]:
                per_task[int(batch.task[b])].append(-log_prob(model.logits, b, i, int(batch.ids[b, i + 1])))
    means = [sum(v) / len(v) for v in per_task.values()]
    assert balanced.loss.item() == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert balanced.nll.item() == pytest.approx(total / n, rel=1e-5)  # the NLL stays the token mean


def tiny_model(causal: bool = False, d: int = 64) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V.size, n_layer=2, n_head=2, n_embd=d, max_seq_len=64, causal=causal,
                      image_grid=(3, 3), codebook_size=V.codebook_size, image_offset=V.image_offset,
                      codebook_dim=4, tie_head=True)  # tied: the overfit bars were set on this head
    model = Transformer(cfg)
    model.set_codebook(torch.randn(V.codebook_size, 4))
    return model


def test_loss_is_finite_and_falls_on_a_fixed_batch() -> None:
    batch = small_batch()
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t_eval = torch.linspace(0.2, 0.9, len(batch))

    def evaluate() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            return masked_diffusion_loss(model, batch, V, t=t_eval, generator=g).loss.item()

    before = evaluate()
    for step in range(30):
        out = masked_diffusion_loss(model, batch, V, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert evaluate() < 0.6 * before


def memorise(causal: bool, steps: int) -> float:
    """Train on 8 text-to-image sequences (distinct captions -> distinct images); return the final loss
    with every target masked (t = 1: the whole image predicted from the caption alone)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 8, (8, 3, 3), generator=g)
    samples = [t2i_sample([i, (i * 7) % 30], images[i], V, L) for i in range(8)]
    batch = collate(samples, V)
    model = tiny_model(causal)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        if causal:
            out = ar_loss(model, batch)
        else:
            out = masked_diffusion_loss(model, batch, V, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        if causal:
            return ar_loss(model, batch).nll.item()
        return masked_diffusion_loss(model, batch, V, t=torch.ones(8)).nll.item()


@pytest.mark.slow  # ~5 s on an idle 2-core CPU, 10+ s when the cores are shared
@pytest.mark.parametrize("causal", [False, True])
def test_overfit_memorises_eight_sequences(causal: bool) -> None:
    final = memorise(causal, steps=200 if causal else 300)  # at 200 steps the MDM is at ~0.03: too close
    assert final < 0.05, f"did not memorise: nll {final:.3f} (chance is {math.log(8):.2f})"


def test_masked_mean_and_task_balanced_weighting_by_hand() -> None:
    """masked_mean = mean CE of masked tokens; task_balanced = mean over tasks of each task's mean."""
    from mmdlm.diffusion import Weighting, masked_diffusion_loss
    from mmdlm.sequence import Batch, Task
    from mmdlm.vocab import Vocab

    vocab = Vocab(10, 4)
    V = vocab.size
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    batch = Batch(ids=ids, target=torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool),
                  pad=torch.zeros(2, 4, dtype=torch.bool), image_index=torch.full((2, 4), -1),
                  cond=torch.zeros(2, 4, dtype=torch.bool), task=torch.tensor([int(Task.T2I), int(Task.VQA)]))
    logits = torch.randn(2, 4, V)

    def model(noisy, pad, image_index, logits_at=None, prefix=None):
        return logits if logits_at is None else logits[logits_at]

    t = torch.tensor([1.0, 1.0])  # everything in the target is masked
    ce = torch.nn.functional.cross_entropy(logits.view(-1, V), ids.view(-1), reduction="none").view(2, 4)
    mean = masked_diffusion_loss(model, batch, vocab, t=t, weighting=Weighting.MASKED_MEAN)
    assert torch.allclose(mean.loss, (ce[0, 1:].sum() + ce[1, 1]) / 4)
    balanced = masked_diffusion_loss(model, batch, vocab, t=t, weighting="masked_mean", task_balanced=True)
    assert torch.allclose(balanced.loss, (ce[0, 1:].mean() + ce[1, 1]) / 2)
    assert torch.allclose(mean.nll, balanced.nll)  # the reported NLL is the ELBO either way


def test_modality_balanced_splits_a_task_between_its_image_and_text_targets_by_hand() -> None:
    """A document task holding an edit (image targets) and an answer (text targets): with `modality_balanced`
    the task's loss is the mean of its image-token mean and its text-token mean, for both objectives."""
    batch = collate([t2i_sample([1, 2], CODES, V, L), vqa_sample(CODES, [([6], [7]), ([8, 9], [10])], V, L)], V)
    batch.task[:] = int(Task.DOC)  # one task, two modalities: an "edit" (9 image tokens) and "answers"
    B, T = batch.ids.shape
    logits = torch.randn(B, T, V.size, generator=torch.Generator().manual_seed(0))
    target, is_image = batch.target & ~batch.pad, batch.image_index >= 0  # (B, T)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, V.size), batch.ids.view(-1),
                                           reduction="none").view(B, T)
    image, text = ce[target & is_image], ce[target & ~is_image]
    assert len(image) == 9 and 0 < len(text) < 9
    model = FixedLogits(logits, causal=False)
    t = torch.ones(B)  # every target masked
    pooled = masked_diffusion_loss(model, batch, V, t=t, weighting="masked_mean", task_balanced=True)
    split = masked_diffusion_loss(model, batch, V, t=t, weighting="masked_mean", task_balanced=True,
                                  modality_balanced=True)
    assert pooled.loss.item() == pytest.approx(torch.cat([image, text]).mean().item(), rel=1e-5)
    assert split.loss.item() == pytest.approx((image.mean() + text.mean()).item() / 2, rel=1e-5)
    assert split.nll.item() == pytest.approx(pooled.nll.item(), rel=1e-6)  # the reported NLL is unchanged

    ar = FixedLogits(logits, causal=True)  # the AR twin: position i predicts token i + 1
    ar_ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V.size), batch.ids[:, 1:].reshape(-1),
                                              reduction="none").view(B, T - 1)
    next_target, next_image = target[:, 1:], is_image[:, 1:]  # (B, T-1)
    expected = (ar_ce[next_target & next_image].mean() + ar_ce[next_target & ~next_image].mean()) / 2
    out = ar_loss(ar, batch, task_balanced=True, modality_balanced=True)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    mixed = small_batch()  # several tasks, each with one modality: the split changes nothing
    model = FixedLogits(torch.randn(4, mixed.ids.shape[1], V.size), causal=False)
    a, b = (masked_diffusion_loss(model, mixed, V, t=torch.ones(4), weighting="masked_mean", task_balanced=True,
                                  modality_balanced=m).loss.item() for m in (False, True))
    assert a == pytest.approx(b, rel=1e-5)


def test_paired_views_partition_the_target_at_complementary_times() -> None:
    """Complementary masking: every target token is masked in exactly one of the two views."""
    batch = small_batch()
    B, T = batch.ids.shape
    model = FixedLogits(torch.randn(2 * B, T, V.size, generator=torch.Generator().manual_seed(0)), causal=False)
    t = torch.tensor([0.3, 0.8, 0.5, 0.4])
    out = masked_diffusion_loss(model, batch, V, t=t, generator=torch.Generator().manual_seed(2), paired=True,
                                weighting="masked_mean")
    first, second = model.seen[:B] == V.mask, model.seen[B:] == V.mask  # (B, T) each
    target = batch.target & ~batch.pad
    assert torch.equal(first | second, target) and not (first & second).any()
    assert out.num_tokens == int(target.sum())
    # the nll is the mean of the two views' ELBO estimates, each at its own time (1 - t for the second)
    lp = model.logits.detach().double().log_softmax(-1)
    ids = batch.ids.repeat(2, 1)
    ce = -lp.gather(-1, ids[..., None])[..., 0]  # (2B, T)
    w = torch.cat([1 / t, 1 / (1 - t)])[:, None]  # (2B, 1): linear schedule everywhere (images too)
    expected = (ce * w * torch.cat([first, second])).sum() / (2 * target.sum())
    assert out.nll.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()


def test_task_times_put_each_task_in_its_interval() -> None:
    from mmdlm.diffusion import task_times

    u = torch.linspace(0.001, 0.999, 40)
    task = torch.tensor([Task.VQA, Task.T2I] * 20)
    t = task_times(u, task, {Task.VQA: (0.5, 1.0)})
    assert (t[task == Task.VQA] >= 0.5).all() and (t[task == Task.T2I] < 0.5).any()
    assert torch.equal(t[task == Task.T2I], u[task == Task.T2I])
    with pytest.raises(ValueError, match="lo < hi"):
        task_times(u, task, {Task.VQA: (0.7, 0.2)})
    # through the loss: a VQA-only batch trained at t in [0.9, 1] masks (nearly) every answer token
    batch = collate([vqa_sample(CODES, [([6], [7]), ([8, 9], [10])], V, L)] * 64, V)
    model = FixedLogits(torch.randn(64, batch.ids.shape[1], V.size), causal=False)
    masked_diffusion_loss(model, batch, V, generator=torch.Generator().manual_seed(0),
                          t_ranges={Task.VQA: (0.9, 1.0)})
    rate = (model.seen == V.mask).sum() / (batch.target & ~batch.pad).sum()
    assert rate > 0.88


def test_ar_loss_force_causal_runs_a_bidirectional_model_as_its_causal_twin() -> None:
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V.size, n_layer=1, n_embd=16, n_head=2, shift_logits=True)
    bidir = Transformer(cfg)
    twin = Transformer(replace(cfg, causal=True))
    twin.load_state_dict(bidir.state_dict())
    batch = small_batch()
    with pytest.raises(ValueError, match="causal model"):
        ar_loss(bidir, batch)
    assert ar_loss(bidir, batch, force_causal=True).loss.item() == pytest.approx(ar_loss(twin, batch).loss.item())


def test_corruption_replaces_clean_targets_in_their_modality_and_scores_them() -> None:
    """Correction training: some clean targets become a wrong token of their modality; the loss
    adds their CE (weight 1) to the ELBO of the masked ones, which `nll` keeps alone."""
    batch = small_batch()
    B, T = batch.ids.shape
    model = FixedLogits(torch.randn(B, T, V.size, generator=torch.Generator().manual_seed(0)), causal=False)
    t = torch.tensor([0.3, 0.5, 0.5, 0.4])
    plain = masked_diffusion_loss(model, batch, V, t=t, generator=torch.Generator().manual_seed(2))
    masked = model.seen == V.mask
    out = masked_diffusion_loss(model, batch, V, t=t, generator=torch.Generator().manual_seed(2), corrupt=0.6)
    assert torch.equal(model.seen == V.mask, masked)  # the same masks: corruption draws after them
    wrong = (model.seen != batch.ids) & ~masked  # (B, T)
    assert bool(wrong.any()) and bool((wrong <= (batch.target & ~batch.pad)).all())  # only clean targets
    is_image = batch.image_index >= 0
    assert bool(V.is_image(model.seen[wrong & is_image]).all())
    assert bool(V.is_text(model.seen[wrong & ~is_image]).all())  # text ids, never a special
    fix = sum(-log_prob(model.logits, b, i, int(batch.ids[b, i])) for b, i in wrong.nonzero().tolist())
    n_target = int(batch.target.sum())
    assert out.nll.item() == pytest.approx(plain.nll.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(plain.loss.item() + fix / n_target, rel=1e-5)
    none = masked_diffusion_loss(model, batch, V, t=t, generator=torch.Generator().manual_seed(2), corrupt=0.0)
    assert torch.equal(none.loss, plain.loss)  # corrupt=0 draws nothing extra: training unchanged


def test_litmdm_trains_with_corruption_and_validates_without() -> None:
    from mmdlm.errors import UserError
    from mmdlm.training import LitMDM

    config = ModelConfig(vocab_size=V.size, n_layer=1, n_head=2, n_embd=32, max_seq_len=64)
    lit = LitMDM(ema_decay=0.0, corrupt=0.3)
    lit.build(config, V)
    assert lit.train_objective.keywords["corrupt"] == 0.3 and "corrupt" not in lit.objective.keywords
    out = lit.train_objective(lit.model, small_batch(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    with pytest.raises(UserError, match="corrupt"):
        LitMDM(corrupt=1.0).build(config, V)
    balanced = LitMDM(ema_decay=0.0, task_balanced=True, modality_balanced=True)
    balanced.build(config, V)
    assert balanced.objective.keywords["modality_balanced"] is True
    with pytest.raises(UserError, match="task_balanced"):
        LitMDM(modality_balanced=True).build(config, V)
