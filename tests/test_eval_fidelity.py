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
