"""Text conditions through a whole distillation step on a tiny random text-conditional LlamaGen teacher: the
generator follows its captions row by row, the teacher-side targets use the teacher's own CFG with its learned null
caption, and a text run (stage 1 + stage 2) resumes exactly across a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from text_run_helpers import SLOTS, WIDTH, caption, text_config, text_teacher, write_text_shards

from dd2dist.conditions import Cond
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.latent import guidance_weights, process_logits
from dd2dist.method.losses import categorical_kl, gts_loss
from dd2dist.nets.student import StudentNet
from dd2dist.train import Trainer
from dd2dist.train.condition_source import CaptionBank, CaptionDraws


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    cfg = text_config(tmp)
    return cfg, text_teacher(cfg)


def _captions(indices) -> Cond:
    pairs = [caption(i) for i in indices]
    bank = CaptionBank(np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs]))
    return bank.rows(torch.arange(len(pairs)))


def _generator(cfg, teacher) -> StudentNet:
    """A student whose head is random (a fresh head is zero: its output would not depend on anything)."""
    net = StudentNet(teacher, cfg.student)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net.eval()


def test_the_generator_follows_its_captions_row_by_row(setup):
    cfg, teacher = setup
    net = _generator(cfg, teacher)
    cond = _captions([0, 3, 5, 6])  # 1, 4, 6 and 7 valid slots
    eps = torch.randn(4, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q = net.generate(eps, cond)
        perm = torch.tensor([2, 0, 3, 1])
        shuffled = net.generate(eps[perm], cond.select(perm))
        torch.testing.assert_close(shuffled, q[perm], rtol=1e-5, atol=1e-6)  # outputs permute with the captions
        same_noise = net.generate(eps[:1].expand(4, -1, -1), cond)
        assert all(not torch.allclose(same_noise[0], same_noise[i]) for i in range(1, 4))  # captions matter
        changed = Cond(text=cond.text.clone(), text_mask=cond.text_mask.clone())
        changed.text[1, -1] += 1.0  # a valid slot of row 1
        q_changed = net.generate(eps, changed)
        assert not torch.allclose(q_changed[1], q[1])
        keep = [0, 2, 3]
        torch.testing.assert_close(q_changed[keep], q[keep], rtol=0, atol=0)  # nothing mixed across rows
        padded = Cond(text=cond.text.clone(), text_mask=cond.text_mask)
        padded.text[0, 0] = 5.0  # row 0 has one valid slot: slot 0 is padding, which the mask hides
        torch.testing.assert_close(net.generate(eps, padded), q, rtol=1e-5, atol=1e-6)


CATEGORICAL = ["student.generator_output=categorical", "student.categorical_order=principal",
               "student.posterior_head=true", "student.noise_input=mlp", "stage2.ode_init_steps=0",
               "compact_head.enabled=false"]


@pytest.mark.parametrize("neighbour_picks", ["none", "left_up"])
def test_a_categorical_generator_and_its_loss_follow_the_captions_row_by_row(setup, tmp_path, neighbour_picks):
    _, teacher = setup
    cfg = text_config(tmp_path, *CATEGORICAL, f"student.neighbour_picks={neighbour_picks}")
    net = StudentNet(teacher, cfg.student).eval()
    cond = _captions([0, 3, 5, 6])
    eps = torch.randn(4, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(1))
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        lp = net.generator_log_probs(eps, cond)
        torch.testing.assert_close(net.generator_log_probs(eps[perm], cond.select(perm)), lp[perm],
                                   rtol=1e-5, atol=1e-5)
        same_noise = net.generator_log_probs(eps[:1].expand(4, -1, -1), cond)
        assert all(not torch.allclose(same_noise[0], same_noise[i]) for i in range(1, 4))  # captions matter
        kl, _ = categorical_kl(net, teacher, eps, cond, cfg.teacher.sampling)
        kl_perm, _ = categorical_kl(net, teacher, eps[perm], cond.select(perm), cfg.teacher.sampling)
        torch.testing.assert_close(kl_perm, kl[perm], rtol=1e-4, atol=1e-5)  # the teacher's target: the row's caption
        wrong, _ = categorical_kl(net, teacher, eps, cond.select(perm), cfg.teacher.sampling)
        assert not torch.allclose(wrong, kl)
        torch.testing.assert_close(net.for_sampling().generate(eps, cond), net.generate(eps, cond))


@pytest.mark.parametrize("extra", [
    ("student.neighbour_picks=none",),
    ("student.neighbour_picks=left_up",),
    # the demo recipes' stage 2: the symmetric divergence, the neighbour-picks head in a faster parameter group
    ("student.neighbour_picks=left_up", "stage2.categorical_divergence=symmetric",
     "stage2.neighbour_picks_lr_scale=10"),
], ids=["plain", "neighbour_picks", "symmetric_faster_head"])
def test_a_categorical_text_run_resumes_exactly_inside_stage2(tmp_path, setup, extra):
    _, teacher = setup
    shards = write_text_shards(tmp_path / "s", setup[0], [list(range(20))])
    cfg = text_config(tmp_path, *CATEGORICAL, "stage2.generator_steps=4", f"data.captions={shards}",
                      "data.caption_bank_size=6", *extra)
    whole, first = _resumed_equals_whole(cfg, teacher, tmp_path, cfg.stage1.steps + 2)
    assert "guidance" not in whole.engines
    groups = whole.engines["generator"].optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == ([1.0, 10.0] if "stage2.neighbour_picks_lr_scale=10" in extra else [1.0])
    assert whole.state.iteration == cfg.stage1.steps + 4 and first.state.iteration == cfg.stage1.steps + 2


def test_the_guidance_features_follow_the_captions(setup):
    cfg, teacher = setup
    net = _generator(cfg, teacher)
    cond = _captions([1, 2, 4])
    x = teacher.codebook()[torch.randint(teacher.vocab_size, (3, teacher.num_tokens),
                                         generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        feats = net.features(x, cond)
        perm = torch.tensor([1, 2, 0])
        torch.testing.assert_close(net.features(x[perm], cond.select(perm)), feats[perm], rtol=1e-5, atol=1e-6)


def test_teacher_targets_use_the_teachers_own_cfg_with_the_null_caption(setup):
    cfg, teacher = setup
    sampling = cfg.teacher.sampling
    assert sampling.guidance_scale == 2.0  # CFG on
    cond = _captions([0, 2, 7])
    ids, sampled_lp = teacher.sample(cond, sampling, generator=torch.Generator().manual_seed(3), return_log_probs=True)
    ids, sampled_lp = ids.clone(), sampled_lp.clone()
    forced = teacher.log_probs(ids, cond, sampling)  # what gts_loss and csd_loss compute
    torch.testing.assert_close(forced, sampled_lp, rtol=1e-4, atol=1e-4)
    # the same rule spelled out: the learned null caption, under each row's own mask
    null = Cond(text=teacher.gpt.cls_embedding.uncond_embedding.expand(3, SLOTS, WIDTH), text_mask=cond.text_mask)
    assert torch.equal(teacher.null_cond(3, like=cond).text, null.text)
    with torch.no_grad():
        c = teacher.head_logits(teacher.features(ids, cond))
        u = teacher.head_logits(teacher.features(ids, null))
    w = guidance_weights(sampling, teacher.step_of_token, len(teacher.steps))
    torch.testing.assert_close(forced, process_logits(c, u, w, sampling), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forced, teacher.log_probs(ids, cond, sampling.with_(guidance_scale=1.0)), atol=1e-3)
    # stage 1: the sampler's log-probs (online sampling) and the teacher-forced ones give the same GTS loss
    student = _generator(cfg, teacher)
    x0 = teacher.codebook()[ids]
    from_sampler, _ = gts_loss(student, teacher, teacher.codebook(), x0, cond, sampling,
                               torch.Generator().manual_seed(4), teacher_log_probs=sampled_lp)
    forced_loss, _ = gts_loss(student, teacher, teacher.codebook(), x0, cond, sampling,
                              torch.Generator().manual_seed(4))
    assert float(from_sampler.detach()) == pytest.approx(float(forced_loss.detach()), rel=1e-4)


def test_stage2_batches_draw_captions_and_ode_pairs_keep_them_with_their_rows(setup, tmp_path):
    cfg, teacher = setup
    cfg = text_config(tmp_path, "stage2.ode_init_steps=2", "stage2.ode_pairs_per_call=2", "stage2.ode_steps=2",
                      f"data.captions={write_text_shards(tmp_path / 's', cfg, [list(range(12))])}")
    trainer = Trainer(cfg, teacher, TorchEngineFactory())
    batches = trainer.batches
    assert isinstance(batches.conditions, CaptionDraws)
    eps0, cond0, ids0 = batches.ode_pairs(5, 0, 0, teacher)
    eps1, cond1, ids1 = batches.ode_pairs(6, 1, 0, teacher)  # the second step of the same block
    block_cond = batches.conditions_for(6, 5, 0, "ode/0/labels")
    assert torch.equal(torch.cat([cond0.text, cond1.text]), block_cond.text)
    assert torch.equal(torch.cat([cond0.text_mask, cond1.text_mask]), block_cond.text_mask)
    # the block's tokens are the teacher's PF-ODE tokens for exactly those captions
    from dd2dist.method.ode_init import teacher_ode_tokens

    again = teacher_ode_tokens(teacher, torch.cat([eps0, eps1]), block_cond, cfg.teacher.sampling,
                               trainer.codebook, cfg.stage2.ode_steps)
    assert torch.equal(again, torch.cat([ids0, ids1]))


def _snapshot(tr: Trainer) -> dict:
    out = {"iteration": tr.state.iteration}
    for name, eng in tr.engines.items():
        out.update({f"{name}/{k}": v for k, v in eng.full_state_dict().items()})
    if tr.ema is not None:
        out.update({f"ema/{i}": t.clone() for i, t in enumerate(tr.ema.shadow)})
    return out


def _resumed_equals_whole(cfg, teacher, tmp_path, stop_at: int) -> tuple[Trainer, Trainer]:
    """Train ``cfg`` whole, and again stopped after ``stop_at`` iterations and resumed from that checkpoint: the two
    end bit for bit alike. Returns the whole run and the stopped one."""

    def trainer() -> Trainer:
        torch.manual_seed(cfg.seed)  # the fresh student head is drawn from the global RNG, as in a worker
        return Trainer(cfg, teacher, TorchEngineFactory())

    whole = trainer()
    whole.fit()
    assert whole.done
    first = trainer()
    first.fit(checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1000, max_iterations=stop_at)
    second = trainer()
    assert second.resume_latest(tmp_path / "ckpt") is not None
    second.fit()
    a, b = _snapshot(whole), _snapshot(second)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    return whole, first


@pytest.mark.parametrize("stop_at", [1, 4])  # inside stage 1 (online text sampling); inside a regression block
def test_a_text_run_resumes_exactly(tmp_path, setup, stop_at):
    _, teacher = setup
    shards = write_text_shards(tmp_path / "s", setup[0], [list(range(20))])
    cfg = text_config(tmp_path, "stage2.ode_init_steps=2", "stage2.ode_pairs_per_call=2", "stage2.ode_steps=2",
                      "stage2.regression_weight=0.5", f"data.captions={shards}", "data.caption_bank_size=6")
    _resumed_equals_whole(cfg, teacher, tmp_path, stop_at)


def test_sample_grids_of_a_text_run_show_the_first_captions_of_the_bank(setup, tmp_path):
    from dd2dist.launch.sample_grid import GRID_ROWS, generator_grid, grid_captions

    cfg, teacher = setup
    cfg = text_config(tmp_path, f"data.captions={write_text_shards(tmp_path / 's', cfg, [[0, 1, 2]])}")
    trainer = Trainer(cfg, teacher, TorchEngineFactory())
    captions = grid_captions(trainer)
    assert torch.equal(captions.text, _captions([0, 1, 2, 0, 1, 2, 0, 1]).text) and captions.batch_size == GRID_ROWS
    net = _generator(cfg, teacher)
    grid = generator_grid(net, teacher, trainer.num_classes, 3, per_class=2, captions=captions)
    assert grid.shape == (3 * 16, 2 * 16, 3)
    rows = [grid[r * 16:(r + 1) * 16] for r in range(3)]
    assert not np.array_equal(rows[0], rows[1])  # one caption per row
