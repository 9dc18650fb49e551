"""The teacher-referenced fidelity metric on a known joint: a sampler that is the teacher scores at the floor, the
product of marginals and a generator that ignores the prefix score near zero dependence captured, a half-right
one in between; pairwise token statistics against hand counts."""

from __future__ import annotations

import pytest
import torch

from dd2dist.eval.fidelity import dependence_captured, feature_scores, marginal_product_draw
from dd2dist.eval.token_marginals import class_position_counts
from dd2dist.eval.token_pairs import pair_counts, pair_index, pair_tv

V, N, C = 6, 5, 2
M = 6000  # samples per set


def _chain(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A strongly dependent class-conditional Markov chain: start (C, V) and transition (C, V, V) probabilities."""
    g = torch.Generator().manual_seed(seed)
    start = torch.softmax(torch.randn(C, V, generator=g), -1)
    trans = torch.softmax(3.0 * torch.randn(C, V, V, generator=g), -1)
    return start, trans


def _draw(chain, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Sequences (M, N) of the chain."""
    start, trans = chain
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(labels.shape[0], N, dtype=torch.long)
    ids[:, 0] = torch.multinomial(start[labels], 1, generator=g)[:, 0]
    for i in range(1, N):
        ids[:, i] = torch.multinomial(trans[labels, ids[:, i - 1]], 1, generator=g)[:, 0]
    return ids


def _prefix_blind(chain, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A broken generator whose every position ignores the tokens before it: position i is taken from its own
    independent chain, so each marginal is right and no two positions depend on each other."""
    return torch.stack([_draw(chain, labels, seed + i)[:, i] for i in range(N)], dim=1)


def _features(ids: torch.Tensor) -> torch.Tensor:
    """A feature network that is the token code vectors side by side (FID then sees the pairwise covariances)."""
    codebook = torch.randn(V, 3, generator=torch.Generator().manual_seed(9))
    return codebook[ids].flatten(1).double()


@pytest.fixture(scope="module")
def sets():
    chain = _chain()
    labels = torch.arange(M) % C
    reference, floor, counted = (_draw(chain, labels, s) for s in (1, 2, 3))
    marginals = marginal_product_draw(class_position_counts(counted, labels, C, V), labels, seed=4)
    broken = _prefix_blind(chain, labels, 100)
    half = torch.where((torch.arange(M) % 4 < 2)[:, None], _draw(chain, labels, 6), _prefix_blind(chain, labels, 200))
    return labels, reference, {"teacher": floor, "marginals": marginals, "broken": broken, "half": half}


def _captured(labels, reference, draws) -> dict[str, dict[str, float]]:
    ref_pairs, ref_feats = pair_counts(reference, labels, C, V), _features(reference)
    scores = {name: {"pair_tv": pair_tv(pair_counts(ids, labels, C, V), ref_pairs)["mean"],
                     "fid": feature_scores(_features(ids), ref_feats)["fid_to_teacher"]}
              for name, ids in draws.items()}
    return {name: {key: dependence_captured(s[key], scores["marginals"][key], scores["teacher"][key])
                   for key in ("pair_tv", "fid")} | {f"raw_{k}": v for k, v in s.items()}
            for name, s in scores.items()}


def test_teacher_sits_at_the_floor_and_a_prefix_blind_generator_near_the_marginal_product(sets):
    labels, reference, draws = sets
    got = _captured(labels, reference, draws)
    for key in ("pair_tv", "fid"):
        assert got["teacher"][key] == pytest.approx(1.0)  # by definition: the floor
        assert got["marginals"][key] == pytest.approx(0.0)
        # the marginal product is far from the floor: the metric has a range to measure in
        assert got["marginals"][f"raw_{key}"] > 3 * got["teacher"][f"raw_{key}"]
        assert abs(got["broken"][key]) < 0.15, (key, got["broken"])
        assert 0.25 < got["half"][key] < 0.75, (key, got["half"])


def test_pair_counts_by_hand():
    ids = torch.tensor([[0, 1, 2], [0, 1, 1], [2, 2, 2]])
    labels = torch.tensor([0, 0, 1])
    counts = pair_counts(ids, labels, num_classes=2, vocab_size=3)
    a, b = pair_index(3)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 2)]
    assert counts.shape == (2, 3, 9)
    assert counts[0, 0, 0 * 3 + 1] == 2  # class 0, positions (0, 1), codes (0, 1): both rows
    assert counts[0, 2, 1 * 3 + 2] == 1 and counts[0, 2, 1 * 3 + 1] == 1  # positions (1, 2)
    assert counts[1, 1, 2 * 3 + 2] == 1 and counts[1].sum() == 3
    with pytest.raises(ValueError, match="token ids"):
        pair_counts(ids + 5, labels, 2, 3)


def test_pair_tv_is_zero_on_itself_and_reports_by_distance():
    ids = torch.randint(0, 4, (200, 4), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(200) % 2
    counts = pair_counts(ids, labels, 2, 4)
    out = pair_tv(counts, counts)
    assert out["mean"] == 0.0 and out["by_distance"] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="differ in shape"):
        pair_tv(counts, counts[:, :2])


def test_dependence_captured_is_nan_without_a_range():
    assert dependence_captured(1.0, 2.0, 0.0) == 0.5
    assert dependence_captured(1.0, 1.0, 1.0) != dependence_captured(1.0, 1.0, 1.0)  # nan


@pytest.fixture(scope="module")
def toy_llamagen():
    """A small LlamaGen teacher fitted to a strongly dependent table, its target sampling and a balanced label set."""
    from dd2dist.bench.toy_teacher import ToyTeacherSpec, build_toy_teacher
    from dd2dist.conditions import Sampling

    torch.manual_seed(0)
    teacher, _ = build_toy_teacher(ToyTeacherSpec(family="llamagen", vocab=4, num_classes=2, fit_steps=150))
    return teacher, Sampling(guidance_scale=2.0, guidance_schedule="constant"), torch.arange(4000) % 2


def _teacher_draw(teacher, labels, sampling, seed: int) -> torch.Tensor:
    from dd2dist.conditions import Cond

    return teacher.sample(Cond(labels=labels), sampling, generator=torch.Generator().manual_seed(seed))


def test_teacher_nll_by_position_locates_a_prefix_blind_generator(toy_llamagen):
    """The per-position NLL: a second teacher draw matches the reference at every position, a generator whose
    tokens ignore their prefix matches it at the first position only and loses likelihood at every later one."""
    from dd2dist.eval.fidelity import teacher_nll

    teacher, sampling, labels = toy_llamagen
    reference, second = _teacher_draw(teacher, labels, sampling, 1), _teacher_draw(teacher, labels, sampling, 2)
    blind = torch.stack([_teacher_draw(teacher, labels, sampling, 10 + i)[:, i] for i in range(teacher.num_tokens)],
                        dim=1)
    ref = teacher_nll(teacher, reference, labels, sampling, batch=1000)["per_position"]
    assert len(ref) == teacher.num_tokens
    gap_second = [a - b for a, b in zip(teacher_nll(teacher, second, labels, sampling, 1000)["per_position"], ref)]
    gap_blind = [a - b for a, b in zip(teacher_nll(teacher, blind, labels, sampling, 1000)["per_position"], ref)]
    assert max(abs(g) for g in gap_second) < 0.05, gap_second
    assert abs(gap_blind[0]) < 0.05, gap_blind
    assert min(gap_blind[1:]) > 0.2, gap_blind


def test_a_posterior_head_stage1_model_starts_at_the_teacher_and_a_plain_one_does_not(toy_llamagen):
    """The stage-1 model as an AR-diffusion sampler (the ``stage1_ar`` row): with the posterior head, before any
    training, it samples the teacher's unguided conditionals; the plain head's zero start samples noise cells."""
    from dd2dist.config.schema import StudentConfig
    from dd2dist.eval.fidelity import teacher_nll
    from dd2dist.eval.sampling import ar_diffusion_ids
    from dd2dist.nets import StudentNet

    teacher, _, labels = toy_llamagen
    ref = teacher_nll(teacher, _teacher_draw(teacher, labels, None, 3), labels, None, 1000)
    gaps = {}
    for posterior_head in (True, False):
        net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8,
                                                posterior_head=posterior_head)).eval()
        ids = ar_diffusion_ids(net, teacher, labels, torch.Generator().manual_seed(4), euler_steps=32)
        gaps[posterior_head] = teacher_nll(teacher, ids, labels, None, 1000)["mean"] - ref["mean"]
    assert abs(gaps[True]) < 0.25, gaps  # the soft input rule and 32 Euler steps: not exact
    assert gaps[False] > 0.5, gaps


def test_cached_point_sets_score_exactly_like_torch_fidelity():
    """Precision / recall from reused k-NN radii equal torch-fidelity's per-pair computation, on both sides and
    whichever side is passed prebuilt; FID equals its statistics path."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    from dd2dist.eval.fidelity import PointSet

    g = torch.Generator().manual_seed(3)
    gen, ref = torch.randn(700, 16, generator=g).double(), 0.8 * torch.randn(500, 16, generator=g).double() + 0.3
    precision, recall = calculate_precision_recall_part(gen.float(), ref.float(), 3, 10_000)
    fid = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref), False)
    want = {"fid_to_teacher": float(fid["frechet_inception_distance"]), "precision": precision, "recall": recall}
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # neither trivially 0 nor 1
    for a, b in ((gen, ref), (PointSet(gen), ref), (gen, PointSet(ref)), (PointSet(gen), PointSet(ref))):
        assert feature_scores(a, b) == want
    with pytest.raises(ValueError, match="neighbourhoods"):
        feature_scores(PointSet(gen, 3), PointSet(ref, 5))
