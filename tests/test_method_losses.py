"""GTS / FCS / CSD: values against independent computations, and where gradients flow."""

import pytest
import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.config.schema import StudentConfig
from dd2dist.latent import posterior
from dd2dist.method import csd_loss, fcs_loss, gts_loss
from dd2dist.method.losses import snap_to_codes
from dd2dist.nets import StudentNet
from dd2dist.teachers import VARConfig, build_family

CFG = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4)
SAMPLING = Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_k=20)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = build_family("var", var=CFG).freeze()
    student_cfg = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8)
    gen = StudentNet(teacher, student_cfg)
    gui = StudentNet(teacher, student_cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial heads so every path carries signal
        for net in (gen, gui):
            for p in net.head.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return teacher, gen, gui


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_gts_zero_head_loss_is_teacher_velocity_power(setup):
    teacher, _, _ = setup
    fresh = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    cond = Cond(labels=torch.tensor([0, 1, 2]))
    ids = teacher.sample(cond, SAMPLING, generator=_g(5)).clone()
    x0 = teacher.embed(ids)
    loss, _ = gts_loss(fresh, teacher, teacher.codebook(), x0, cond, SAMPLING, _g(7), t_min=0.1)
    # independent: redraw t then eps from the same seed, closed-form velocity, zero prediction
    g = _g(7)
    t = 0.1 + 0.9 * torch.rand(3, teacher.num_tokens, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt = (1 - t[..., None]) * x0 + t[..., None] * eps
    lp = teacher.log_probs(x0, cond, SAMPLING)
    v = posterior(lp, teacher.codebook(), xt, t).velocity
    assert torch.allclose(loss, v.pow(2).mean(), rtol=1e-5)


def test_gts_target_uses_the_drawn_times_below_the_default_floor(setup):
    """t_min = 0.005 < latent.T_MIN: the target is the closed form at the very t each x_t was built with."""
    teacher, _, _ = setup
    fresh = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    cond = Cond(labels=torch.arange(16) % 4)
    x0 = teacher.embed(teacher.sample(cond, SAMPLING, generator=_g(5)).clone())
    low = 0.005
    loss, _ = gts_loss(fresh, teacher, teacher.codebook(), x0, cond, SAMPLING, _g(7), t_min=low)
    g = _g(7)
    t = low + (1 - low) * torch.rand(16, teacher.num_tokens, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert bool((t < 0.02).any())  # some draws sit below the old clamp
    xt = (1 - t[..., None]) * x0 + t[..., None] * eps
    lp = teacher.log_probs(x0, cond, SAMPLING)
    exact = posterior(lp, teacher.codebook(), xt, t, t_min=low).velocity
    assert torch.allclose(loss, exact.pow(2).mean(), rtol=1e-5)
    clamped = posterior(lp, teacher.codebook(), xt, t).velocity  # what the clamp at 0.02 used to give
    assert not torch.allclose(loss, clamped.pow(2).mean(), rtol=1e-3)


def test_csd_closed_form_uses_the_drawn_times_below_the_default_floor(setup):
    teacher, gen, gui = setup
    cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
    eps = torch.randn(4, teacher.num_tokens, teacher.embed_dim, generator=_g(3))
    with torch.no_grad():
        q = gen.generate(eps, cond)
    low = 0.005
    _, m = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(9), t_min=low, t_max=0.01)
    g = _g(9)
    t = low + (0.01 - low) * torch.rand(4, teacher.num_tokens, generator=g)
    noise = torch.randn(q.shape, generator=g)
    xt = (1 - t[..., None]) * q + t[..., None] * noise
    lp = teacher.log_probs(q, cond, SAMPLING)
    x0_real = posterior(lp, teacher.codebook(), xt, t, t_min=low).x0
    expected_w = (q - x0_real).abs().mean(dim=(1, 2)).mean()
    assert torch.allclose(m["w"], expected_w, rtol=1e-5)


def test_gts_gradient_reaches_student_not_teacher(setup):
    teacher, gen, _ = setup
    cond = Cond(labels=torch.tensor([0, 3]))
    x0 = teacher.embed(teacher.sample(cond, SAMPLING, generator=_g(1)).clone())
    gen.zero_grad(set_to_none=True)
    loss, _ = gts_loss(gen, teacher, teacher.codebook(), x0, cond, SAMPLING, _g(2))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert gen.head.final.linear.weight.grad.abs().sum() > 0
    assert gen.backbone.transformer.blocks[0].attn.mat_qkv.weight.grad.abs().sum() > 0


def test_fcs_target_is_eps_minus_q(setup):
    teacher, _, _ = setup
    fresh = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    cond = Cond(labels=torch.tensor([1, 2]))
    loss, _ = fcs_loss(fresh, q, cond, _g(3), num_samples=3, t_min=0.05)
    g = _g(3)
    torch.rand(3, 2, teacher.num_tokens, generator=g)  # the times come first
    eps = torch.randn(3, *q.shape, generator=g)
    assert torch.allclose(loss, (eps - q).pow(2).mean(), rtol=1e-6)


def test_fcs_gradient_only_to_guidance(setup):
    teacher, gen, gui = setup
    cond = Cond(labels=torch.tensor([1, 2]))
    q = gen.generate(torch.randn(2, teacher.num_tokens, teacher.embed_dim), cond)
    gen.zero_grad(set_to_none=True)
    gui.zero_grad(set_to_none=True)
    loss, _ = fcs_loss(gui, q, cond, _g(4))
    loss.backward()
    assert all(p.grad is None for p in gen.parameters()), "FCS must not reach the generator (q is detached)"
    assert gui.head.final.linear.weight.grad.abs().sum() > 0
    assert gui.backbone.transformer.word_embed.weight.grad.abs().sum() > 0


def _frozen(net):
    net.eval().requires_grad_(False)
    net.zero_grad(set_to_none=True)
    return net


@pytest.mark.parametrize("kind", ["sid", "dmd"])
def test_csd_gradient_flow(setup, kind):
    """No gradient reaches the teacher or ψ's parameters; the prefix passes run without grad on sg(q); every
    position of the generator output receives gradient."""
    teacher, gen, gui = setup
    _frozen(gui)
    seen = []
    orig_lp, orig_feat = teacher.log_probs, gui.features

    def spy_lp(x, cond, sampling=None):
        seen.append(("teacher", torch.is_grad_enabled(), x.requires_grad))
        return orig_lp(x, cond, sampling)

    def spy_feat(x, cond):
        seen.append(("psi", torch.is_grad_enabled(), x.requires_grad))
        return orig_feat(x, cond)

    teacher.log_probs, gui.features = spy_lp, spy_feat
    try:
        cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
        q = torch.randn(4, teacher.num_tokens, teacher.embed_dim, requires_grad=True)
        loss, m = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(9), kind=kind)
        loss.backward()
    finally:
        del teacher.log_probs, gui.features
    assert seen == [("teacher", False, False), ("psi", False, False)]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in gui.parameters())
    per_pos = q.grad.abs().sum(-1)
    assert (per_pos > 0).all(), f"{kind}: some positions get no generator gradient"
    assert torch.isfinite(loss) and m["w"] > 0


def test_csd_reaches_generator_parameters_at_every_position(setup):
    teacher, gen, gui = setup
    _frozen(gui)
    gen.train().requires_grad_(True)
    cond = Cond(labels=torch.tensor([0, 3]))
    eps = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    q = gen.generate(eps, cond)
    q.retain_grad()
    gen.zero_grad(set_to_none=True)
    loss, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(11))
    loss.backward()
    assert (q.grad.abs().sum(-1) > 0).all()
    assert gen.head.final.linear.weight.grad.abs().sum() > 0
    assert gen.backbone.transformer.blocks[0].ffn.fc1.weight.grad.abs().sum() > 0


def _reference_x0s(q, teacher, gui, cond, seed, t_min=0.02, t_max=0.96, teacher_prefix=None, guidance_prefix=None):
    g = _g(seed)
    t = t_min + (t_max - t_min) * torch.rand(q.shape[:2], generator=g)
    eps = torch.randn(q.shape, generator=g)
    xt = (1 - t[..., None]) * q + t[..., None] * eps
    lp = teacher.log_probs(q.detach() if teacher_prefix is None else teacher_prefix, cond, SAMPLING)
    x0_real = posterior(lp, teacher.codebook(), xt, t).x0
    gui_prefix = q.detach() if guidance_prefix is None else guidance_prefix
    x0_fake = xt - t[..., None] * gui.velocity(xt, t, gui.features(gui_prefix, cond))
    return x0_real, x0_fake


def test_csd_sid_value_matches_formula(setup):
    teacher, _, gui = setup
    _frozen(gui)
    cond = Cond(labels=torch.tensor([1, 3]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    for alpha in (1.0, 0.5):
        loss, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13), alpha=alpha)
        xr, xf = _reference_x0s(q, teacher, gui, cond, 13)
        w = (q - xr).abs().mean(dim=(1, 2))
        ref = (((xr - xf) * ((xr - q) - alpha * (xr - xf))).sum(-1) / w[:, None]).mean()
        assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)


def test_csd_snap_conditions_only_the_teacher_on_nearest_codes(setup):
    teacher, _, gui = setup
    _frozen(gui)
    cond = Cond(labels=torch.tensor([1, 3]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    snapped = teacher.codebook()[teacher.quantize(q)]
    loss, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13), teacher_prefix="snap")
    xr, xf = _reference_x0s(q, teacher, gui, cond, 13, teacher_prefix=snapped)  # psi still sees q itself
    w = (q - xr).abs().mean(dim=(1, 2))
    ref = (((xr - xf) * (xf - q)).sum(-1) / w[:, None]).mean()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    continuous, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13))
    assert not torch.allclose(loss, continuous)  # the option changes the teacher's prefix, so the value
    with pytest.raises(ValueError, match="teacher_prefix"):
        csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13), teacher_prefix="round")
    both, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13), teacher_prefix="snap",
                       guidance_prefix="snap")
    xr, xf = _reference_x0s(q, teacher, gui, cond, 13, teacher_prefix=snapped, guidance_prefix=snapped)
    w = (q - xr).abs().mean(dim=(1, 2))
    assert torch.allclose(both, (((xr - xf) * (xf - q)).sum(-1) / w[:, None]).mean(), rtol=1e-5, atol=1e-7)


def test_fcs_prefix_replaces_only_the_backbone_input(setup):
    teacher, _, gui = setup
    cond = Cond(labels=torch.tensor([0, 2]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    snapped = snap_to_codes(q, teacher.codebook(), teacher.family)
    assert torch.equal(snapped, teacher.codebook()[teacher.quantize(q)])
    loss, _ = fcs_loss(gui, q, cond, _g(3), num_samples=1, prefix=snapped)
    g = _g(3)
    t = 0.02 + 0.98 * torch.rand(q.shape[:2], generator=g)
    eps = torch.randn((1, *q.shape), generator=g)[0]
    xt = (1 - t[..., None]) * q + t[..., None] * eps
    v = gui.velocity(xt, t, gui.features(snapped, cond))  # the noisy token stays continuous
    assert torch.allclose(loss, (v - (eps - q)).pow(2).mean(), rtol=1e-5, atol=1e-7)


def test_csd_dmd_gradient_is_score_difference(setup):
    teacher, _, gui = setup
    _frozen(gui)
    cond = Cond(labels=torch.tensor([2, 0]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim, requires_grad=True)
    loss, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(17), kind="dmd")
    loss.backward()
    with torch.no_grad():
        xr, xf = _reference_x0s(q.detach(), teacher, gui, cond, 17)
        w = (q - xr).abs().mean(dim=(1, 2), keepdim=True)
        expected = (xf - xr) / w / (q.shape[0] * q.shape[1])
    assert torch.allclose(q.grad, expected, rtol=1e-4, atol=1e-8)


def test_csd_rejects_unknown_kind(setup):
    teacher, _, gui = setup
    q = torch.randn(1, teacher.num_tokens, teacher.embed_dim)
    with pytest.raises(ValueError, match="csd_loss"):
        csd_loss(q, teacher, gui, teacher.codebook(), Cond(labels=torch.tensor([0])), SAMPLING, _g(), kind="kl")


def test_csd_gradient_is_own_position_only(setup):
    """Autograd's dL/dq_j equals the finite difference of the SiD formula with everything the prefix decides
    frozen at q (teacher log-probs, ψ's features) and the normaliser w frozen: no gradient through the prefix."""
    teacher, _, gui = setup
    _frozen(gui)
    cond = Cond(labels=torch.tensor([1, 2]))
    torch.manual_seed(3)
    q0 = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    q = q0.clone().requires_grad_(True)
    loss, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(21))
    loss.backward()
    with torch.no_grad():
        lp0, f0 = teacher.log_probs(q0, cond, SAMPLING), gui.features(q0, cond)
        g = _g(21)
        t = 0.02 + 0.94 * torch.rand(q0.shape[:2], generator=g)
        eps = torch.randn(q0.shape, generator=g)

        def x0s(x):
            xt = (1 - t[..., None]) * x + t[..., None] * eps
            return posterior(lp0, teacher.codebook(), xt, t).x0, xt - t[..., None] * gui.velocity(xt, t, f0)

        w0 = (q0 - x0s(q0)[0]).abs().mean(dim=(1, 2))

        def frozen_prefix_loss(x):
            xr, xf = x0s(x)
            return (((xr - xf) * (xf - x)).sum(-1) / w0[:, None]).mean().double()

        h = 1e-2
        for b, j, c in [(0, 0, 0), (0, 3, 1), (1, 5, 2), (1, teacher.num_tokens - 1, 3), (0, 8, 0)]:
            e = torch.zeros_like(q0)
            e[b, j, c] = h
            fd = (frozen_prefix_loss(q0 + e) - frozen_prefix_loss(q0 - e)) / (2 * h)
            assert float(q.grad[b, j, c]) == pytest.approx(float(fd), rel=0.03, abs=1e-5), (b, j, c)


def test_gts_with_sampler_log_probs_equals_teacher_forced(setup):
    """The trainer passes the sampler's own log-probs as the GTS target: they must be the teacher-forced ones."""
    teacher, gen, _ = setup
    cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
    ids, lp = teacher.sample(cond, SAMPLING, generator=_g(8), return_log_probs=True)
    x0 = teacher.embed(ids.clone())
    with torch.no_grad():
        a, _ = gts_loss(gen, teacher, teacher.codebook(), x0, cond, SAMPLING, _g(9), teacher_log_probs=lp.clone())
        b, _ = gts_loss(gen, teacher, teacher.codebook(), x0, cond, SAMPLING, _g(9))
    assert torch.allclose(a, b, rtol=1e-5)


def _teacher_based_guidance(teacher, zero=True):
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.head.parameters():
            p.add_(0.2 * torch.randn_like(p))
    if zero:
        net.zero_head_output()
    return net


@pytest.mark.parametrize("kind", ["sid", "dmd"])
def test_csd_on_a_teacher_based_guidance_at_its_start_moves_nothing(setup, kind):
    """ψ = the teacher's velocity + a zeroed correction is exactly the teacher: the CSD gradient is zero, where a
    plain ψ at the same weights pushes the generator by its own fitting error."""
    teacher, _, _ = setup
    gui = _frozen(_teacher_based_guidance(teacher))
    cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
    q = torch.randn(4, teacher.num_tokens, teacher.embed_dim, requires_grad=True)
    loss, m = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(9), kind=kind, guidance_base="teacher")
    loss.backward()
    assert float(m["score_gap"]) == 0.0
    assert torch.count_nonzero(q.grad) == 0
    q.grad = None
    plain, m_plain = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(9), kind=kind)
    plain.backward()
    assert float(m_plain["score_gap"]) > 0 and q.grad.abs().sum() > 0


def test_csd_on_a_teacher_based_guidance_uses_its_correction_only(setup):
    """x̂0_Φ - x̂0_ψ = t · correction, with the teacher on the prefix CSD gives it (here: snapped)."""
    teacher, _, _ = setup
    gui = _frozen(_teacher_based_guidance(teacher, zero=False))
    cond = Cond(labels=torch.tensor([1, 3]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    snapped = teacher.codebook()[teacher.quantize(q)]
    loss, _ = csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13), teacher_prefix="snap",
                       guidance_base="teacher")
    g = _g(13)
    t = 0.02 + 0.94 * torch.rand(q.shape[:2], generator=g)
    eps = torch.randn(q.shape, generator=g)
    xt = (1 - t[..., None]) * q + t[..., None] * eps
    xr = posterior(teacher.log_probs(snapped, cond, SAMPLING), teacher.codebook(), xt, t).x0
    xf = xr - t[..., None] * gui.correction(xt, t, gui.features(q, cond))
    w = (q - xr).abs().mean(dim=(1, 2))
    assert torch.allclose(loss, (((xr - xf) * (xf - q)).sum(-1) / w[:, None]).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="guidance_base"):
        csd_loss(q, teacher, gui, teacher.codebook(), cond, SAMPLING, _g(13), guidance_base="student")


def test_fcs_on_a_teacher_based_guidance_fits_the_correction_on_the_teachers_velocity(setup):
    teacher, _, _ = setup
    gui = _teacher_based_guidance(teacher)
    gui.zero_grad(set_to_none=True)
    cond = Cond(labels=torch.tensor([0, 2]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    lp = teacher.log_probs(q, cond, SAMPLING)
    loss, m = fcs_loss(gui, q, cond, _g(3), num_samples=2, base_log_probs=lp, codebook=teacher.codebook())
    g = _g(3)
    t = 0.02 + 0.98 * torch.rand((2, *q.shape[:2]), generator=g)
    eps = torch.randn((2, *q.shape), generator=g)
    xt = (1 - t[..., None]) * q + t[..., None] * eps
    v = torch.stack([posterior(lp, teacher.codebook(), xt[i], t[i]).velocity for i in range(2)])
    assert torch.allclose(loss, (v - (eps - q)).pow(2).mean(), rtol=1e-5, atol=1e-7)  # the correction is 0
    assert float(m["correction_rms"]) == 0.0
    loss.backward()
    assert gui.head.final.linear.weight.grad.abs().sum() > 0  # the zeroed output layer learns first
    with pytest.raises(ValueError, match="codebook"):
        fcs_loss(gui, q, cond, _g(3), base_log_probs=lp)


def test_the_guidance_base_is_the_teacher_on_the_prefix_csd_gives_it(setup):
    """guidance_step's base log-probs: the teacher on sg(q) or on its nearest codes as ``teacher_prefix`` says (so
    that ψ's base and CSD's teacher are one function); none for the paper's guidance network."""
    from types import SimpleNamespace

    from dd2dist.method.steps import guidance_base_log_probs

    teacher, _, _ = setup
    cond = Cond(labels=torch.tensor([1, 3]))
    q = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    snapped = teacher.codebook()[teacher.quantize(q)]

    def cfg(base, prefix):
        return SimpleNamespace(stage2=SimpleNamespace(guidance_base=base, teacher_prefix=prefix),
                               teacher=SimpleNamespace(sampling=SAMPLING))

    assert guidance_base_log_probs(cfg("none", "snap"), teacher, teacher.codebook(), q, cond) is None
    got = guidance_base_log_probs(cfg("teacher", "continuous"), teacher, teacher.codebook(), q, cond)
    assert torch.equal(got, teacher.log_probs(q, cond, SAMPLING))
    got = guidance_base_log_probs(cfg("teacher", "snap"), teacher, teacher.codebook(), q, cond)
    assert torch.equal(got, teacher.log_probs(snapped, cond, SAMPLING))
    assert not torch.equal(got, teacher.log_probs(q, cond, SAMPLING))
