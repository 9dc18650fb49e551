"""Student nets: zero-init head, what is copied/dropped/frozen, generator causality, the LlamaGen input rule."""

from dataclasses import replace

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config.schema import StudentConfig
from dd2dist.nets import MLPHead, StudentNet
from dd2dist.nets.student import sharp_soft_tau
from dd2dist.teachers import LlamaGenConfig, VARConfig, build_family

SMALL_VAR = VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4)
SMALL_LG = LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=3, num_classes=4)  # dim >= V: exact adapter fit


def _teacher(family: str):
    torch.manual_seed(0)
    if family == "var":
        return build_family("var", var=SMALL_VAR).freeze()
    return build_family("llamagen", llamagen=SMALL_LG).freeze()


def _randomize_head(head: MLPHead) -> None:
    """Give the zero-initialised parts random values so every input dependency shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)


def test_head_zero_init_outputs_zero_velocity():
    head = MLPHead(token_dim=5, cond_dim=7, width=16, depth=2, time_embed_dim=8)
    x, f, t = torch.randn(3, 4, 5), torch.randn(3, 4, 7), torch.rand(3, 4)
    assert torch.equal(head(x, t, f), torch.zeros(3, 4, 5))
    # and it is a real function of its inputs once trained away from zero
    with torch.no_grad():
        head.final.linear.weight.normal_()
    assert head(x, t, f).abs().sum() > 0


def test_head_scalar_time_equals_the_same_time_per_token():
    # the generator's scalar t is embedded once and broadcast: it must agree with t given for every token
    head = MLPHead(token_dim=5, cond_dim=7, width=16, depth=2, time_embed_dim=8)
    _randomize_head(head)
    x, f = torch.randn(3, 4, 5), torch.randn(3, 4, 7)
    per_token = head(x, torch.full((3, 4), 0.7), f)
    assert per_token.abs().sum() > 0
    torch.testing.assert_close(head(x, 0.7, f), per_token, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head(x, torch.tensor(0.7), f), per_token, rtol=1e-5, atol=1e-6)


def test_head_is_the_adaln_formula_with_each_layer_s_own_silu_projection():
    # the head computes SiLU(c) once for all AdaLN layers; written out with each layer's (SiLU, Linear) module it
    # must give the same velocity, so checkpoints of either layout mean the same function
    import torch.nn.functional as F

    from dd2dist.nets.head import LN_EPS, timestep_embedding

    head = MLPHead(token_dim=5, cond_dim=7, width=16, depth=2, time_embed_dim=8)
    _randomize_head(head)
    x, f, t = torch.randn(3, 4, 5), torch.randn(3, 4, 7), torch.rand(3, 4)
    c = head.time_mlp(timestep_embedding(t, 8)) + head.cond_proj(f)
    h = head.input_proj(x)
    for block in head.blocks:
        shift, scale, gate = block.ada(c).chunk(3, dim=-1)
        h = h + gate * block.mlp(F.layer_norm(h, (16,), eps=LN_EPS) * (1 + scale) + shift)
    shift, scale = head.final.ada(c).chunk(2, dim=-1)
    expected = head.final.linear(F.layer_norm(h, (16,), eps=LN_EPS) * (1 + scale) + shift)
    torch.testing.assert_close(head(x, t, f), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_fresh_student_generates_its_noise_and_predicts_zero_velocity(family):
    teacher = _teacher(family)
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    eps = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    cond = Cond(labels=torch.tensor([0, 3]))
    assert torch.equal(net.generate(eps, cond), eps)  # q = eps - 0
    feats = net.features(eps, cond)
    assert feats.shape == (2, teacher.num_tokens, teacher.hidden_dim)
    assert torch.equal(net.velocity(eps, torch.rand(2, teacher.num_tokens), feats), torch.zeros_like(eps))


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_student_drops_head_and_tokenizer_and_freezes_codebook(family):
    teacher = _teacher(family)
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    names = {n for n, _ in net.named_parameters()}
    assert not any(".tokenizer." in n for n in names), "tokenizer weights must not be trainable parameters"
    assert not any(n.startswith(("backbone.transformer.head.", "backbone.gpt.output.")) for n in names)
    buffers = dict(net.named_buffers())
    assert not any(k.startswith(("backbone.tokenizer.encoder", "backbone.tokenizer.decoder")) for k in buffers)
    # the latent space (codebook) is the teacher's, kept as a frozen buffer
    assert torch.equal(net.backbone.codebook(), teacher.codebook())
    # the teacher is untouched: still frozen and complete
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.codebook().shape[0] == teacher.vocab_size


def test_var_student_backbone_equals_teacher_features():
    teacher = _teacher("var")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    x = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    cond = Cond(labels=torch.tensor([1, 2]))
    assert torch.allclose(net.features(x, cond), teacher.features(x, cond), atol=1e-6)


def test_llamagen_student_reads_vectors_through_the_teachers_soft_rule():
    teacher = _teacher("llamagen")
    assert teacher.cfg.input_adapter == "snap"
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    assert net.backbone.cfg.input_adapter == "soft"
    assert net.backbone.cfg.soft_tau == pytest.approx(sharp_soft_tau(teacher.codebook()))
    assert teacher.cfg.input_adapter == "snap"  # the teacher's own config is untouched
    # the embedding table stays, trainable (it is the soft rule's table); the classifier head is gone
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert "backbone.gpt.tok_embeddings.weight" in names
    ids = torch.randint(teacher.vocab_size, (2, teacher.num_tokens))
    cond = Cond(labels=torch.tensor([0, 1]))
    # on code vectors the student's features reproduce the teacher's (snap reads ids exactly)
    ref = teacher.features(ids, cond)
    got = net.features(teacher.embed(ids), cond)
    assert (got - ref).norm() / ref.norm() < 1e-2


def test_sharp_soft_tau_keeps_each_code_its_own_weight():
    """The derived temperature gives every code >= 99% of its own soft weight, and not much more (it is the
    largest such tau up to the union bound), checked against the softmax itself."""
    torch.manual_seed(3)
    codebook = torch.nn.functional.normalize(torch.randn(40, 4), dim=-1)
    tau = sharp_soft_tau(codebook)
    self_weight = torch.softmax(codebook @ codebook.T / tau, dim=-1).diagonal()
    assert self_weight.min() >= 0.99 - 1e-6
    loose = torch.softmax(codebook @ codebook.T / (3 * tau), dim=-1).diagonal()
    assert loose.min() < 0.99
    # exact duplicates are ignored rather than forcing tau to the floor
    dup = torch.cat([codebook, codebook[:1]])
    assert sharp_soft_tau(dup) == pytest.approx(tau, rel=0.01)  # one more code: a slightly different log term
    with pytest.raises(ValueError, match="self_weight"):
        sharp_soft_tau(codebook, self_weight=1.0)


def test_llamagen_student_input_embeddings_stay_bounded_on_noise():
    """The issue-7 failure: an adapter fitted on the codes alone returned embeddings hundreds of times larger on
    N(0, I) noise than on codes, so the generator's noise rows drowned the class prefix. The student's input
    embedding of any vector is a convex mix of table rows, and its features keep the class at every position."""
    teacher = _teacher("llamagen")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    gpt = net.backbone.gpt
    eps = torch.randn(64, teacher.embed_dim) * 3
    with torch.no_grad():
        emb = gpt.embed_inputs(eps[None], net.backbone.codebook())[0]
    assert emb.norm(dim=-1).max() <= gpt.tok_embeddings.weight.norm(dim=-1).max() + 1e-6
    noise = torch.randn(8, teacher.num_tokens, teacher.embed_dim)
    with torch.no_grad():
        f0 = net.features(noise, Cond(labels=torch.zeros(8, dtype=torch.long)))
        f1 = net.features(noise, Cond(labels=torch.ones(8, dtype=torch.long)))
        t0 = teacher.features(noise, Cond(labels=torch.zeros(8, dtype=torch.long)))
        t1 = teacher.features(noise, Cond(labels=torch.ones(8, dtype=torch.long)))
    student_change = (f0 - f1)[:, 1:].norm(dim=-1).mean()
    teacher_change = (t0 - t1)[:, 1:].norm(dim=-1).mean()
    assert student_change > 0.5 * teacher_change


def test_llamagen_student_copies_an_mlp_adapted_teacher():
    """A stage-0 adapted teacher (trained input_mlp) is copied as it is: its adapter reads every input."""
    torch.manual_seed(0)
    teacher = build_family("llamagen", llamagen=replace(SMALL_LG, input_adapter="mlp")).freeze()
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    assert net.backbone.cfg.input_adapter == "mlp"
    assert net.backbone.gpt.tok_embeddings is None and net.backbone.gpt.output is None
    x = torch.randn(2, teacher.num_tokens, teacher.embed_dim)
    cond = Cond(labels=torch.tensor([0, 3]))
    assert torch.equal(net.features(x, cond), teacher.features(x, cond))


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_generator_is_causal_in_ar_steps(family):
    """q_i depends on eps of earlier AR steps and on its own eps_i only (never on later steps or same-step peers)."""
    teacher = _teacher(family)
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    _randomize_head(net.head)
    step = teacher.step_of_token
    cond = Cond(labels=torch.tensor([2]))
    eps = torch.randn(1, teacher.num_tokens, teacher.embed_dim, requires_grad=True)
    q = net.generate(eps, cond)
    N = teacher.num_tokens
    for i in range(N):
        (g,) = torch.autograd.grad(q[0, i].sum(), eps, retain_graph=True)
        depends = g[0].abs().sum(-1) > 0  # (N,)
        for j in range(N):
            allowed = bool(step[j] < step[i]) or j == i
            if not allowed:
                assert not depends[j], f"q_{i} (step {int(step[i])}) depends on eps_{j} (step {int(step[j])})"
        assert depends[i], f"q_{i} must depend on its own noise"
        if step[i] > 0:
            assert depends[step < step[i]].any(), f"q_{i} must see the noise of earlier steps"


def test_llamagen_soft_tau_follows_the_loaded_codebook():
    """An exported student is loaded into a build from a randomly initialised teacher: after loading, the soft
    rule's tau must be the one of the loaded codebook (what training used), not of the random one."""
    trained = StudentNet(_teacher("llamagen"), StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    torch.manual_seed(7)
    other_teacher = build_family("llamagen", llamagen=SMALL_LG).freeze()
    fresh = StudentNet(other_teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    assert fresh.backbone.cfg.soft_tau != pytest.approx(trained.backbone.cfg.soft_tau)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.backbone.cfg.soft_tau == pytest.approx(trained.backbone.cfg.soft_tau)
    x = torch.randn(2, other_teacher.num_tokens, other_teacher.embed_dim)
    cond = Cond(labels=torch.tensor([0, 2]))
    assert torch.equal(fresh.features(x, cond), trained.features(x, cond))


def test_llamagen_student_builds_on_the_meta_device():
    with torch.device("meta"):
        teacher = build_family("llamagen", llamagen=SMALL_LG)
        net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    assert net.backbone.cfg.input_adapter == "soft"


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("t", [1.0, 0.35])
def test_fixed_time_head_is_the_head_at_that_time(depth, t):
    # the sampling form folds the time MLP, stacks the AdaLN projections and moves "1 + scale" into the bias:
    # the same velocity as the training head, for any depth and time, batched or not
    head = MLPHead(token_dim=5, cond_dim=7, width=16, depth=depth, time_embed_dim=8)
    _randomize_head(head)
    fixed = head.at_time(t)
    x, f = torch.randn(3, 4, 5), torch.randn(3, 4, 7)
    v = head(x, t, f)
    assert v.abs().sum() > 0
    torch.testing.assert_close(fixed(x, f), v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed(x[0], f[0]), v[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FixedTimeHead expects"):
        fixed(x, f[..., :6])


def test_fixed_time_head_is_a_snapshot():
    # taken once the weights are final: later training of the source head must not leak into it (and vice versa)
    head = MLPHead(token_dim=5, cond_dim=7, width=16, depth=1, time_embed_dim=8)
    _randomize_head(head)
    fixed = head.at_time(1.0)
    x, f = torch.randn(2, 3, 5), torch.randn(2, 3, 7)
    before = fixed(x, f).clone()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    assert torch.equal(fixed(x, f), before)
    assert not any(b.requires_grad for b in fixed.buffers())
    assert list(fixed.parameters()) == []


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_one_step_sampler_generates_what_the_student_generates(family):
    teacher = _teacher(family)
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=2, time_embed_dim=8)).eval()
    _randomize_head(net.head)
    sampler = net.for_sampling()
    eps = torch.randn(3, teacher.num_tokens, teacher.embed_dim)
    cond = Cond(labels=torch.tensor([0, 1, 3]))
    with torch.no_grad():
        expected = net.generate(eps, cond)
    assert (expected - eps).abs().sum() > 0
    torch.testing.assert_close(sampler.generate(eps, cond), expected, rtol=1e-5, atol=1e-5)
    assert sampler.backbone is net.backbone  # shared, not copied
    assert (sampler.num_tokens, sampler.embed_dim) == (net.num_tokens, net.embed_dim)
    with pytest.raises(ValueError, match="eps must be"):
        sampler.generate(eps[:, :-1], cond)


def _within_cell_pair(net, gen):
    """Two noise sequences that differ only at position 0, by a move (a rescaling) that keeps its nearest code and
    its soft-rule weights to 1e-5: rows where the two differ more are left out."""
    from dd2dist.teachers.llamagen import soft_input_weights

    eps = torch.randn(32, net.num_tokens, net.embed_dim, generator=gen)
    moved = eps.clone()
    moved[:, 0] *= 1.5  # the same direction, so the same largest dot product with the unit codes
    cb, tau = net.backbone.codebook(), net.backbone.cfg.soft_tau
    same = (soft_input_weights(eps[:, 0], cb, tau) - soft_input_weights(moved[:, 0], cb, tau)).abs().amax(-1) < 1e-5
    assert int(same.sum()) >= 8
    return eps[same], moved[same]


@pytest.mark.parametrize("noise_input", ["none", "mlp"])
def test_llamagen_generator_features_see_earlier_noise_within_a_code_cell(noise_input):
    """Only with the continuous input path do later positions' features depend on the noise of an earlier
    position beyond the code cell it falls in."""
    teacher = _teacher("llamagen")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, noise_input=noise_input))
    eps, moved = _within_cell_pair(net, torch.Generator().manual_seed(4))
    cond = Cond(labels=torch.arange(eps.shape[0]) % 4)
    with torch.no_grad():
        if noise_input == "mlp":  # a fresh path adds zero: the student starts as the teacher does
            plain = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
            assert torch.equal(net.features(eps, cond), plain.features(eps, cond))
            net.backbone.gpt.vector_input.net[2].weight.normal_(0, 0.3)  # as training moves it away from zero
        change = (net.features(eps, cond) - net.features(moved, cond))[:, 1:].abs().max()
    if noise_input == "mlp":
        assert change > 1e-2
    else:
        assert change < 1e-4


def test_continuous_input_path_learns_within_cell_information():
    """A gradient reaches the path's zero-initialised output layer from a loss on later positions."""
    teacher = _teacher("llamagen")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, noise_input="mlp"))
    eps = torch.randn(4, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(5))
    net.features(eps, Cond(labels=torch.arange(4)))[:, 1:].pow(2).sum().backward()
    assert net.backbone.gpt.vector_input.net[2].weight.grad.abs().sum() > 0


def test_var_continuous_input_path_starts_at_zero_and_feeds_each_scale_its_parents_raw_vector():
    """VAR: a fresh path leaves the features as the teacher's; once it has moved, a token's features depend on the
    raw vector of the token of the previous scale it lies in, and not on that of other tokens of that scale."""
    teacher = _teacher("var")
    cfg = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8)
    net = StudentNet(teacher, replace(cfg, noise_input="mlp"))
    plain = StudentNet(teacher, cfg)
    eps = torch.randn(3, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(6))
    cond = Cond(labels=torch.arange(3))
    with torch.no_grad():
        assert torch.equal(net.features(eps, cond), plain.features(eps, cond))
        net.backbone.vector_input.net[2].weight.normal_(0, 0.3)  # as training moves it away from zero
        pn = teacher.patch_nums  # (1, 2, ...): scale 1 has 4 tokens on a 2x2 grid, scale 2 sits above them
        s1, s2 = teacher.steps[1], teacher.steps[2]
        moved = eps.clone()
        moved[:, s1.start] += 0.5  # the top-left token of scale 1
        only_path = net.backbone._parent_inputs(moved) - net.backbone._parent_inputs(eps)
        rows = only_path[:, s2.start - teacher.steps[0].stop: s2.stop - teacher.steps[0].stop]  # scale 2's inputs
        changed = rows.abs().amax(-1).reshape(3, pn[2], pn[2]) > 0
        parent_row = torch.arange(pn[2]) * pn[1] // pn[2]  # the scale-1 row / column each scale-2 one lies in
        above = (parent_row[:, None] == 0) & (parent_row[None, :] == 0)
        assert torch.equal(changed, above.expand_as(changed))  # exactly the tokens above the moved one
    out = net.features(eps, cond)
    out[:, teacher.steps[1]].pow(2).sum().backward()
    assert net.backbone.vector_input.net[2].weight.grad.abs().sum() > 0


def test_noise_input_is_refused_by_name_for_an_unknown_value():
    from dd2dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="student.noise_input"):
        load_config("configs/base.yaml", ["student.noise_input=linear"])


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_posterior_head_starts_at_the_teachers_closed_form_velocity(family):
    """With the MLP head at its zero start, a posterior-head student on a code prefix predicts the closed-form
    velocity of the teacher's own (unguided) conditionals, and its sampling form generates what it generates."""
    from dd2dist.latent import posterior

    teacher = _teacher(family)
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True))
    assert net.code_logits is not None and net.code_logits.weight.requires_grad
    torch.manual_seed(2)
    ids = torch.randint(0, teacher.vocab_size, (4, teacher.num_tokens))
    cond = Cond(labels=torch.tensor([0, 1, 2, 3]))
    codebook = teacher.codebook().float()
    x_t, t = torch.randn(4, teacher.num_tokens, teacher.embed_dim), torch.rand(4, teacher.num_tokens) * 0.9 + 0.05
    with torch.no_grad():
        got = net.velocity(x_t, t, net.features(codebook[ids], cond))
        want = posterior(teacher.log_probs(ids, cond, None), codebook, x_t, t).velocity
    assert (got - want).abs().max() < 0.02 * want.abs().max(), (got - want).abs().max()
    _randomize_head(net.head)  # the MLP part now adds to the mixture
    eps = torch.randn(4, teacher.num_tokens, teacher.embed_dim)
    with torch.no_grad():
        expected = net.generate(eps, cond)
    torch.testing.assert_close(net.for_sampling().generate(eps, cond), expected, rtol=1e-5, atol=1e-5)


def test_a_var_posterior_head_reads_the_class_modulated_features_of_the_teachers_output_layer():
    """VAR's logits are head(head_nm(h, class)): the student keeps head_nm, its features are head_nm's output, and
    its code logits (a copy of head) on them equal the teacher's unguided logits; without the option both go."""
    from dd2dist.config.schema import ExperimentConfig, TeacherConfig

    teacher = _teacher("var")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True))
    assert net.backbone.transformer.head is None and net.backbone.transformer.head_nm is not None
    plain = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8))
    assert plain.backbone.transformer.head is None and plain.backbone.transformer.head_nm is None
    assert not teacher.features_after_head_norm  # the teacher itself is untouched
    ids = torch.randint(0, teacher.vocab_size, (3, teacher.num_tokens), generator=torch.Generator().manual_seed(4))
    cond = Cond(labels=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        torch.testing.assert_close(net.code_log_probs(net.features(teacher.embed(ids), cond)),
                                   teacher.log_probs(ids, cond, None), rtol=1e-5, atol=1e-5)
    ExperimentConfig(teacher=TeacherConfig(family="var", var=SMALL_VAR), student=StudentConfig(posterior_head=True))


def test_fcs_computes_the_posterior_heads_code_log_probs_once():
    """FCS runs the head on m noise draws of the same features: the code logits run once per position, not m
    times, and the loss equals the one computed with the logits recomputed for every draw."""
    from dd2dist.method import fcs_loss

    teacher = _teacher("llamagen")
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True))
    _randomize_head(net.head)
    q = torch.randn(3, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(6))
    cond = Cond(labels=torch.tensor([0, 1, 2]))
    rows = []
    net.code_logits.register_forward_hook(lambda _m, inputs, _out: rows.append(inputs[0].shape[0]))
    loss, _ = fcs_loss(net, q, cond, torch.Generator().manual_seed(7), num_samples=4)
    assert rows == [3]  # one call on the B = 3 feature rows

    class PerDraw(torch.nn.Module):  # the same net without the shared log-probs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def features(self, seq, c):
            return self.inner.features(seq, c)

        def code_log_probs(self, feats):
            return None

        def velocity(self, x_t, t, feats, log_probs=None):
            return self.inner.velocity(x_t, t, feats)

    rows.clear()
    again, _ = fcs_loss(PerDraw(net), q, cond, torch.Generator().manual_seed(7), num_samples=4)
    assert rows == [12]
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_a_generator_without_the_posterior_mixture_outputs_eps_minus_its_mlp(family):
    """student.generator_posterior=false: the guidance role keeps the mixture in its velocity, the generator's
    one-step output (and its sampling form) is eps - MLP(eps, t=1, f), as with a plain head."""
    teacher = _teacher(family)
    cfg = StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, posterior_head=True, generator_posterior=False)
    net = StudentNet(teacher, cfg)
    _randomize_head(net.head)
    with_mixture = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8,
                                                     posterior_head=True))
    with_mixture.load_state_dict(net.state_dict())
    eps = torch.randn(3, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(5))
    cond = Cond(labels=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        feats = net.features(eps, cond)
        got = net.generate(eps, cond)
        torch.testing.assert_close(got, eps - net.head(eps, 1.0, feats))
        torch.testing.assert_close(net.for_sampling().generate(eps, cond), got, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(with_mixture.generate(eps, cond), got)
        x_t, t = torch.randn_like(eps), torch.full(eps.shape[:2], 0.5)
        torch.testing.assert_close(net.velocity(x_t, t, feats), with_mixture.velocity(x_t, t, feats))
