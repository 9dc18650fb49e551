"""The earlier-noise probe: a backbone that reads noise only through its code cell (LlamaGen's soft rule) shows
little of it to later positions; VAR's continuous input path and LlamaGen's optional continuous path show most."""

import pytest
import torch

from dd2dist.config.schema import StudentConfig
from dd2dist.eval.noise_probe import noise_recoverability, ridge_r2
from dd2dist.nets import StudentNet
from dd2dist.teachers import LlamaGenConfig, VARConfig, build_family

ARCH = {"var": VARConfig(depth=1, width=32, num_heads=2, patch_nums=(1, 2, 3), num_classes=4),
        "llamagen": LlamaGenConfig(n_layer=1, n_head=4, dim=64, grid=3, num_classes=4)}


def _probe(family: str, noise_input: str = "none", trained_path: bool = False) -> float:
    torch.manual_seed(0)
    teacher = build_family(family, **{family: ARCH[family]}).freeze()
    net = StudentNet(teacher, StudentConfig(head_width=16, head_depth=1, time_embed_dim=8, noise_input=noise_input))
    if trained_path:
        with torch.no_grad():  # as training moves the zero-initialised output layer
            net.backbone.gpt.vector_input.net[2].weight.normal_(0, 0.3)
    return noise_recoverability(net, teacher.steps, 4, num=2000)["mean"]


def test_ridge_r2_is_one_for_a_linear_map_and_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    assert ridge_r2(x, x @ torch.randn(5, 3, generator=g), 200, ridge=1e-8) == pytest.approx(1.0, abs=1e-6)
    assert abs(ridge_r2(x, torch.randn(400, 3, generator=g), 200)) < 0.1


def test_llamagen_soft_rule_hides_earlier_noise_that_var_and_the_continuous_path_show():
    soft, with_path, var = _probe("llamagen"), _probe("llamagen", "mlp", trained_path=True), _probe("var")
    assert soft < 0.5  # only the code cell of the earlier noise reaches the later position
    assert with_path > soft + 0.3 and var > soft + 0.3
