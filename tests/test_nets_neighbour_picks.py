"""A categorical generator that reads its own picks at earlier positions (``student.neighbour_picks``): LlamaGen at
the left and upper neighbours (and the mean of the whole prefix), VAR at the same place in every earlier scale.
Refused where it has no meaning, a fresh head is the plain categorical generator, each position's log-probs are the
posterior head's on the features plus the MLP of exactly the codes picked before it, causal in the noise, sampled as
trained and trained by the exact KL."""

from pathlib import Path

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config import load_config
from dd2dist.config.schema import ConfigError
from dd2dist.method.losses import categorical_kl_loss
from dd2dist.nets.categorical import pick_codes
from dd2dist.nets.student import StudentNet, code_log_probs
from dd2dist.teachers import build_seeded_teacher

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "experiments" / "smoke_llamagen_torch.yaml"
CATEGORICAL = ["student.generator_output=categorical", "student.categorical_order=principal",
               "student.posterior_head=true", "student.noise_input=mlp", "stage2.ode_init_steps=0",
               "compact_head.enabled=false"]


def _cfg(*overrides: str):
    return load_config(RECIPE, [*CATEGORICAL, *overrides], check_paths=False)


@pytest.fixture(scope="module")
def teacher():
    return build_seeded_teacher(_cfg().teacher, 0).freeze()


def _net(teacher, which="left_up", seed=0) -> StudentNet:
    torch.manual_seed(seed)
    return StudentNet(teacher, _cfg(f"student.neighbour_picks={which}").student).eval()


def _trained_looking(net: StudentNet) -> StudentNet:
    """The MLP's zero output layer drawn at random, as after some training."""
    with torch.no_grad():
        net.neighbour_picks.mlp[2].weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
    return net


def _inputs(teacher, batch=32, seed=1):
    eps = torch.randn(batch, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(seed))
    return eps, Cond(labels=torch.arange(batch) % teacher.num_classes)


@pytest.mark.parametrize("overrides", [
    ["student.generator_output=continuous", "student.neighbour_picks=left"],
    ["student.neighbour_picks=left_up", "teacher.family=var"],
    ["student.neighbour_picks=parents"],  # a raster teacher has no scales
])
def test_neighbour_picks_are_refused_without_a_categorical_llamagen_generator(overrides):
    with pytest.raises(ConfigError, match=r"student\.neighbour_picks"):
        load_config(RECIPE, [*CATEGORICAL, *overrides], check_paths=False)


def test_a_fresh_head_is_the_plain_categorical_generator(teacher):
    net = _net(teacher)
    plain = StudentNet(teacher, _cfg().student).eval()
    missing = plain.load_state_dict(net.state_dict(), strict=False)
    assert all(k.startswith("neighbour_picks.") for k in missing.unexpected_keys) and not missing.missing_keys
    eps, cond = _inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(net.generator_log_probs(eps, cond), plain.generator_log_probs(eps, cond))
        assert torch.equal(net.generate(eps, cond), plain.generate(eps, cond))


def test_each_position_reads_exactly_the_codes_picked_at_its_neighbours(teacher):
    net = _trained_looking(_net(teacher))
    eps, cond = _inputs(teacher)
    grid = teacher.cfg.grid
    head = net.neighbour_picks
    with torch.no_grad():
        lp, picked = net.generator_outputs(eps, cond)
        ids = pick_codes(lp, eps, net.code_order())
        assert torch.equal(picked, ids)  # the loop's own picks are the ones its log-probs give
        feats = net.features(eps, cond)
        none = torch.full((eps.shape[0],), teacher.vocab_size)
        for i in range(teacher.num_tokens):
            left = ids[:, i - 1] if i >= 1 else none
            up = ids[:, i - grid] if i >= grid else none
            mixed = feats[:, i] + head.embed[0](left) + head.embed[1](up)
            expect = code_log_probs(net.code_logits, feats[:, i] + head.mlp(mixed))
            torch.testing.assert_close(lp[:, i], expect, rtol=1e-5, atol=1e-5)
        # the picks matter: the same features with other neighbours give other log-probs
        other = code_log_probs(net.code_logits, feats[:, 1] + head.mlp(feats[:, 1] + head.embed[0](none)
                                                                       + head.embed[1](none)))
        assert not torch.allclose(other, lp[:, 1])
        # the one-step sampler is the same generator, and so is a reloaded copy
        out = net.generate(eps, cond)
        assert torch.equal(out, net.backbone.codebook()[ids])
        assert torch.equal(net.for_sampling().generate(eps, cond), out)
        again = _net(teacher, seed=7)
        again.load_state_dict(net.state_dict())
        assert torch.equal(again.generate(eps, cond), out)


def test_the_generator_stays_causal_in_its_noise(teacher):
    net = _trained_looking(_net(teacher, "left"))
    eps, cond = _inputs(teacher)
    with torch.no_grad():
        out = net.generate(eps, cond)
        later = eps.clone()
        later[:, -1] = -later[:, -1]
        moved = net.generate(later, cond)
    assert torch.equal(moved[:, :-1], out[:, :-1]) and not torch.equal(moved[:, -1], out[:, -1])


def test_the_exact_kl_trains_the_head_and_lowers_the_kl(teacher):
    net = _trained_looking(_net(teacher)).train()
    sampling = _cfg().teacher.sampling
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(40):
        eps, cond = _inputs(teacher, batch=16, seed=100 + step)
        loss, _ = categorical_kl_loss(net, teacher, eps, cond, sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            head = net.neighbour_picks
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in (*head.mlp.parameters(), *(t.weight for t in head.embed)))
            assert all(p.grad is None for p in net.head.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses


# ---- VAR: the same place in every earlier scale ---------------------------------------------------------------

VAR_RECIPE = ROOT / "configs" / "demo" / "smoke_var_unconditional.yaml"


def test_scale_sources_name_the_place_each_token_covers_in_every_earlier_scale():
    from dd2dist.nets.neighbour_picks import scale_sources

    sources, waves = scale_sources((1, 2, 4))
    assert waves == [(0, 1), (1, 5), (5, 21)]
    assert sources[0].tolist() == [-1, -1] and sources[1:5].tolist() == [[0, -1]] * 4
    # scale 3, row-major 4 x 4: row 0, columns 0-3 lie under scale-2 tokens 1, 1, 2, 2; rows 2-3 under 3, 3, 4, 4
    assert sources[5:9, 0].tolist() == [1, 1, 2, 2] and sources[13:17, 0].tolist() == [3, 3, 4, 4]
    assert set(sources[5:, 1].tolist()) == {0}  # and all under the first scale's one token


@pytest.fixture(scope="module")
def var_teacher():
    cfg = load_config(VAR_RECIPE, check_paths=False)
    return build_seeded_teacher(cfg.teacher, 0).freeze()


def test_each_var_token_reads_exactly_the_codes_picked_at_its_place_in_the_earlier_scales(var_teacher):
    from dd2dist.nets.neighbour_picks import scale_sources

    teacher = var_teacher
    torch.manual_seed(0)
    cfg = load_config(VAR_RECIPE, ["student.neighbour_picks=parents"], check_paths=False)
    net = _trained_looking(StudentNet(teacher, cfg.student).eval())
    plain = StudentNet(teacher, load_config(VAR_RECIPE, ["student.neighbour_picks=none"],
                                            check_paths=False).student).eval()
    eps, cond = _inputs(teacher)
    sources, _ = scale_sources(teacher.patch_nums)
    head = net.neighbour_picks
    with torch.no_grad():
        lp, picked = net.generator_outputs(eps, cond)
        assert torch.equal(picked, pick_codes(lp, eps, net.code_order()))
        feats = net.features(eps, cond)
        for i in range(teacher.num_tokens):
            mixed = feats[:, i]
            for table, src in zip(head.embed, sources[i].tolist()):
                mixed = mixed + table(picked[:, src] if src >= 0 else torch.full_like(picked[:, 0], teacher.vocab_size))
            expect = code_log_probs(net.code_logits, feats[:, i] + head.mlp(mixed))
            torch.testing.assert_close(lp[:, i], expect, rtol=1e-5, atol=1e-5)
        # noise of the last scale moves only the last scale; a fresh head is the plain categorical generator
        later = eps.clone()
        later[:, 5:] = -later[:, 5:]
        assert torch.equal(net.generate(later, cond)[:, :5], net.generate(eps, cond)[:, :5])
        plain.load_state_dict(net.state_dict(), strict=False)
        fresh = StudentNet(teacher, cfg.student).eval()
        fresh.load_state_dict(plain.state_dict(), strict=False)
        torch.nn.init.zeros_(fresh.neighbour_picks.mlp[2].weight)
        assert torch.equal(fresh.generate(eps, cond), plain.generate(eps, cond))


@pytest.mark.parametrize("layout, which", [(4, "left_up"), ((1, 2, 4), "parents")])
def test_the_head_builds_under_the_meta_device_with_its_source_tables(layout, which):
    """The ZeRO-3 launch builds the student on the meta device before loading weights: the tables of which codes each
    position reads are plain data, built on the CPU all the same."""
    from dd2dist.nets.neighbour_picks import NeighbourPicks

    with torch.device("meta"):
        head = NeighbourPicks(64, 32, layout, which)
    cpu = NeighbourPicks(64, 32, layout, which)
    assert head.embed[0].weight.is_meta and head.sources == cpu.sources and head.waves == cpu.waves


def test_the_prefix_head_adds_the_mean_embedding_of_every_earlier_pick(teacher):
    net = _trained_looking(_net(teacher, "left_up_prefix"))
    eps, cond = _inputs(teacher)
    grid, head = teacher.cfg.grid, net.neighbour_picks
    with torch.no_grad():
        lp, ids = net.generator_outputs(eps, cond)
        feats = net.features(eps, cond)
        none = torch.full((eps.shape[0],), teacher.vocab_size)
        for i in range(teacher.num_tokens):
            left = ids[:, i - 1] if i >= 1 else none
            up = ids[:, i - grid] if i >= grid else none
            prefix = head.prefix(ids[:, :i]).mean(1) if i else head.prefix(none)
            mixed = feats[:, i] + head.embed[0](left) + head.embed[1](up) + prefix
            expect = code_log_probs(net.code_logits, feats[:, i] + head.mlp(mixed))
            torch.testing.assert_close(lp[:, i], expect, rtol=1e-5, atol=1e-5)
        # the last position reads a pick no neighbour table reaches: the first token, through the prefix's mean
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % teacher.vocab_size
        assert not torch.allclose(head.prefix(changed[:, :-1]).mean(1), head.prefix(ids[:, :-1]).mean(1))
