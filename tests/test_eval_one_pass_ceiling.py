"""The categorical one-pass generator (the ceiling diagnostic): exact per-position draws, causal in the noise,
trained on its own samples towards the teacher's joint."""

import pytest
import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.eval.one_pass_ceiling import CeilingOptions, categorical_one_pass, train_ceiling
from dd2dist.method.losses import target_kl
from dd2dist.nets.categorical import inverse_cdf_pick, noise_uniform, pick_codes


@pytest.fixture(scope="module")
def toy_teacher():
    """A small LlamaGen teacher fitted to a strongly dependent table (4 codes, 2 classes) and its target."""
    from dd2dist.bench.toy_teacher import ToyTeacherSpec, build_toy_teacher

    torch.manual_seed(0)
    teacher, _ = build_toy_teacher(ToyTeacherSpec(family="llamagen", vocab=4, num_classes=2, fit_steps=150))
    return teacher.freeze(), Sampling(guidance_scale=2.0, guidance_schedule="constant")


def test_inverse_cdf_pick_draws_each_code_with_its_probability():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = noise_uniform(torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)))[:, None]  # (M, 1)
    ids = inverse_cdf_pick(probs.expand(200_000, 1, 4), u)[:, 0]
    freq = torch.bincount(ids, minlength=4).double() / ids.numel()
    assert torch.allclose(freq, probs.double(), atol=0.005), freq
    assert inverse_cdf_pick(probs, torch.tensor(1.0)) == 3  # u at the top edge stays in range


def test_tokens_follow_the_logits_and_ignore_later_noise(toy_teacher):
    teacher, _ = toy_teacher
    torch.manual_seed(1)
    net = categorical_one_pass(teacher).eval()
    gen = torch.Generator().manual_seed(2)
    eps = torch.randn((4000, net.num_tokens, net.embed_dim), generator=gen)
    cond = Cond(labels=torch.arange(4000) % 2)
    with torch.no_grad():
        lp = net.generator_log_probs(eps, cond)
        ids = pick_codes(lp, eps)
        vectors = net.generate(eps, cond)
    assert torch.equal(teacher.quantize(vectors), ids)  # outputs are the picked codes themselves
    # the first token depends on its class only: its frequencies are the class's softmax
    for c in (0, 1):
        rows = cond.labels == c
        freq = torch.bincount(ids[rows, 0], minlength=teacher.vocab_size).double() / int(rows.sum())
        assert torch.allclose(freq, lp[rows, 0].exp().mean(0).double(), atol=0.03)
    # causal in the noise: changing the last position's noise leaves every earlier token as it was
    later = eps.clone()
    later[:, -1] = torch.randn((4000, net.embed_dim), generator=gen)
    with torch.no_grad():
        moved = pick_codes(net.generator_log_probs(later, cond), later)
    assert torch.equal(moved[:, :-1], ids[:, :-1]) and not torch.equal(moved[:, -1], ids[:, -1])


def test_the_loss_is_a_kl_zero_at_the_target():
    target = torch.log_softmax(torch.tensor([[[2.0, 0.0, -float("inf"), 1.0]]]), -1)
    assert float(target_kl(target, target.clamp_min(-1e4)).abs()) < 1e-6
    other = torch.log_softmax(torch.zeros(1, 1, 4), -1)
    expected = float((target.exp() * (target - other)).nan_to_num(0.0).sum())  # the filtered code adds nothing
    assert float(target_kl(target, other)) == pytest.approx(expected, abs=1e-6) and expected > 0.1


def test_training_on_its_own_samples_moves_the_joint_towards_the_teacher(toy_teacher):
    """A short run lowers the per-sequence KL, and the trained generator's samples score a teacher NLL near the
    teacher's own, well below the untrained one's."""
    from dd2dist.eval.fidelity import teacher_nll

    teacher, sampling = toy_teacher
    torch.manual_seed(0)
    net, report = train_ceiling(teacher, sampling, CeilingOptions(steps=150, batch_size=64, lr=3e-3, log_every=30),
                                log=lambda _: None)
    curve = [p["kl"] for p in report["curve"]]
    assert curve[-1] < 0.5 * curve[0], curve
    labels = torch.arange(2000) % 2
    cond = Cond(labels=labels)
    eps = torch.randn((2000, net.num_tokens, net.embed_dim), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    untrained = categorical_one_pass(teacher).eval()
    with torch.no_grad():
        trained_ids = teacher.quantize(net.generate(eps, cond))
        untrained_ids = teacher.quantize(untrained.generate(eps, cond))
    reference = teacher.sample(cond, sampling, generator=torch.Generator().manual_seed(6))
    nll = {name: teacher_nll(teacher, ids, labels, sampling, 1000)["mean"]
           for name, ids in (("teacher", reference), ("trained", trained_ids), ("untrained", untrained_ids))}
    assert nll["trained"] - nll["teacher"] < 0.75 * (nll["untrained"] - nll["teacher"]), nll


def test_extra_layers_start_as_the_identity_and_train(toy_teacher):
    teacher, _ = toy_teacher
    eps = torch.randn((8, teacher.num_tokens, teacher.embed_dim), generator=torch.Generator().manual_seed(3))
    cond = Cond(labels=torch.arange(8) % 2)
    torch.manual_seed(4)
    plain = categorical_one_pass(teacher)
    torch.manual_seed(4)
    deeper = categorical_one_pass(teacher, extra_layers=2)
    assert len(deeper.backbone.gpt.layers) == len(plain.backbone.gpt.layers) + 2
    assert torch.allclose(deeper.generator_log_probs(eps, cond), plain.generator_log_probs(eps, cond), atol=1e-6)
    deeper.generator_log_probs(eps, cond)[..., 0].sum().backward()  # the zeroed projections still get gradients
    last = deeper.backbone.gpt.layers[-1]
    assert float(last.feed_forward.w2.weight.grad.abs().sum()) > 0
    assert float(last.attention.wo.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="only LlamaGen"):
        from dd2dist.bench.toy_teacher import ToyTeacherSpec, build_toy_teacher

        var, _ = build_toy_teacher(ToyTeacherSpec(family="var", fit_steps=0))
        categorical_one_pass(var, extra_layers=1)


def test_the_ceiling_can_read_its_neighbours_picks(toy_teacher):
    teacher, sampling = toy_teacher
    net, report = train_ceiling(teacher, sampling, CeilingOptions(steps=4, batch_size=8, neighbour_picks="left_up",
                                                                  code_order="principal", log_every=2,
                                                                  neighbour_picks_lr_scale=10.0,
                                                                  divergence="symmetric"))
    assert net.neighbour_picks is not None and report["options"]["neighbour_picks"] == "left_up"
    assert (report["options"]["divergence"], report["options"]["neighbour_picks_lr_scale"]) == ("symmetric", 10.0)
    assert float(net.neighbour_picks.mlp[2].weight.abs().sum()) > 0  # trained away from its zero start
