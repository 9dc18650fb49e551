"""The compact sampling head: exact start from the full head, the regression fit, its file, its use in sampling."""

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config.schema import StudentConfig
from dd2dist.eval.compact import class_conditions
from dd2dist.nets import StudentNet
from dd2dist.nets.compact_head import (
    CompactHead,
    CompactHeadSpec,
    fit_compact_head,
    load_compact_head,
    multiply_adds_per_token,
    save_compact_head,
)
from dd2dist.teachers import LlamaGenConfig, VARConfig, build_family

SMALL_VAR = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4)
SMALL_LG = LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=3, num_classes=4)


def _generator(family: str, width: int = 24, depth: int = 2) -> StudentNet:
    """A student whose zero-initialised head parts are random, so the head is a real function of every input."""
    torch.manual_seed(0)
    arch = {"var": SMALL_VAR} if family == "var" else {"llamagen": SMALL_LG}
    teacher = build_family(family, **arch).freeze()
    net = StudentNet(teacher, StudentConfig(head_width=width, head_depth=depth, time_embed_dim=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.head.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return net.eval().requires_grad_(False)


def _inputs(net: StudentNet, batch: int = 6, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(batch, net.num_tokens, net.embed_dim, generator=g)
    cond = Cond(labels=torch.randint(4, (batch,), generator=g))
    return eps, cond


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_full_rank_start_is_the_full_head(family):
    net = _generator(family)
    sampler = net.for_sampling()
    head = CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(24, 2, 0))
    head.init_from(sampler.head)
    eps, cond = _inputs(net)
    compact = net.for_sampling(head)
    with torch.no_grad():
        ref = net.generate(eps, cond)
        torch.testing.assert_close(compact.generate(eps, cond), ref, rtol=1e-5, atol=1e-5)
    assert (ref - eps).abs().max() > 0.1  # the head does something


def test_low_rank_start_is_the_truncated_svd_of_the_modulation():
    net = _generator("var")
    full = net.for_sampling().head
    eps, cond = _inputs(net)
    with torch.no_grad():
        feats = net.features(eps, cond)
        target = full(eps, feats)
        errors = []
        for rank in (2, 8, 24):  # 24 = the width: every singular value kept, exact
            head = CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(24, 2, rank))
            head.init_from(full)
            errors.append(float((head(eps, feats) - target).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_init_from_refuses_another_geometry():
    net = _generator("var")
    head = CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(16, 1, 0))
    with pytest.raises(ValueError, match="width 24, depth 2"):
        head.init_from(net.for_sampling().head)


def test_spec_refuses_bad_sizes():
    with pytest.raises(ValueError, match="width must be > 0"):
        CompactHeadSpec(0, 1)
    with pytest.raises(ValueError, match="depth and rank >= 0"):
        CompactHeadSpec(8, -1)
    with pytest.raises(ValueError, match="depth and rank >= 0"):
        CompactHeadSpec(8, 1, -1)


def test_multiply_adds_count_the_layers():
    # Ce = 8, D = 128, width 64, depth 1, full rank: cond 128*64, modulation 64*(5*64), input 8*64,
    # MLP 2*64*64, output 64*8
    assert multiply_adds_per_token(8, 128, CompactHeadSpec(64, 1, 0)) == 8192 + 20480 + 512 + 8192 + 512
    # rank 16 replaces 64*320 by 16*(64 + 320)
    assert multiply_adds_per_token(8, 128, CompactHeadSpec(64, 1, 16)) == 8192 + 6144 + 512 + 8192 + 512


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_fit_regresses_a_smaller_head_onto_the_generator_s_head(family):
    net = _generator(family)
    spec = CompactHeadSpec(16, 0 if family == "llamagen" else 1, 4)
    kwargs = dict(steps=150, lr=3e-3, batch_rows=512, pool_sequences=96, refresh_every=50, seed=5, log=lambda m: None)
    head, report = fit_compact_head(net.for_sampling(), spec, class_conditions(4), **kwargs)
    assert report["relative_error_after"] < 0.5 * report["relative_error_before"]
    assert report["spec"] == {"width": 16, "depth": spec.depth, "rank": 4} and report["steps"] == 150
    assert report["multiply_adds_per_token"] < report["full_multiply_adds_per_token"]
    assert not any(p.requires_grad for p in head.parameters()) and not head.training
    # seeded: the same fit again gives the same head, and the caller's global RNG is not moved by it
    torch.manual_seed(11)
    expected_next = torch.rand(1)
    torch.manual_seed(11)
    again, _ = fit_compact_head(net.for_sampling(), spec, class_conditions(4), **kwargs)
    assert torch.equal(torch.rand(1), expected_next)
    for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # the generator itself is untouched
    assert all(not p.requires_grad for p in net.parameters())


def test_fit_refuses_a_head_that_is_not_folded():
    net = _generator("var")
    with pytest.raises(TypeError, match="FixedTimeHead"):
        fit_compact_head(net, CompactHeadSpec(8, 1), class_conditions(4), steps=1)
    with pytest.raises(ValueError, match="batch_rows"):
        fit_compact_head(net.for_sampling(), CompactHeadSpec(8, 1), class_conditions(4), batch_rows=0)


def test_file_round_trip_and_bad_files(tmp_path):
    net = _generator("llamagen")
    head = CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(24, 2, 5))
    head.init_from(net.for_sampling().head)
    path = tmp_path / "export" / "generator_compact_head.safetensors"
    save_compact_head(head, path, {"relative_error_after": 0.01})
    assert path.with_suffix(".json").is_file()
    loaded = load_compact_head(path)
    assert loaded.spec == head.spec and loaded.time == 1.0 and not loaded.training
    eps, cond = _inputs(net)
    with torch.no_grad():
        assert torch.equal(net.for_sampling(loaded).generate(eps, cond), net.for_sampling(head).generate(eps, cond))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors"):
        load_compact_head(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_compact_head(tmp_path / "nothing.safetensors")


def test_sampler_refuses_a_head_at_another_time():
    net = _generator("var")
    head = CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(8, 1), time=0.5)
    with pytest.raises(ValueError, match="t = 0.5"):
        net.for_sampling(head)


@pytest.mark.parametrize("depth, rank", [(2, 0), (2, 6), (0, 0)])
def test_folded_compact_head_is_the_same_function(depth, rank):
    net = _generator("llamagen")
    torch.manual_seed(4)
    head = CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(16, depth, rank)).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folded = head.folded()
    assert folded.low_rank == bool(rank) and (folded.width, folded.depth, folded.time) == (16, depth, 1.0)
    eps, cond = _inputs(net)
    with torch.no_grad():
        feats = net.features(eps, cond)
        torch.testing.assert_close(folded(eps, feats), head(eps, feats), rtol=1e-5, atol=1e-6)
        before = folded(eps, feats)
        head.out.bias.add_(1.0)  # a snapshot: later changes to the module do not reach it
        assert torch.equal(folded(eps, feats), before)
    with pytest.raises(ValueError, match="already low-rank"):
        CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(16, 2, 0)).init_from(
            CompactHead(net.embed_dim, net.backbone.hidden_dim, CompactHeadSpec(16, 2, 3)).folded())
