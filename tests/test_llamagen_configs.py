"""configs/teachers/llamagen_*.yaml: they load, name the released architectures, and build working teachers."""

from pathlib import Path

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config.loader import load_config
from dd2dist.teachers import build_teacher
from dd2dist.teachers.arch import OFFICIAL_ARCHS
from dd2dist.teachers.llamagen import LlamaGenTeacher

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "teachers"


@pytest.mark.parametrize("kind", ["llamagen_b", "llamagen_l", "llamagen_t2i_xl"])
def test_official_configs_spell_out_the_released_architecture(kind):
    cfg = load_config(CONFIGS / f"{kind}.yaml").teacher
    assert cfg.family == "llamagen" and cfg.official == kind
    assert cfg.llamagen == OFFICIAL_ARCHS[kind]
    assert cfg.sampling.guidance_schedule == "constant"


def test_tiny_config_builds_a_teacher_and_loads_its_own_checkpoint(tmp_path):
    cfg = load_config(CONFIGS / "llamagen_tiny.yaml").teacher
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    assert isinstance(teacher, LlamaGenTeacher) and teacher.num_tokens == 16
    ckpt = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    torch.manual_seed(1)
    again = build_teacher(load_config(CONFIGS / "llamagen_tiny.yaml", [f"teacher.checkpoint={ckpt}"]).teacher)
    ids = teacher.sample(Cond(labels=torch.tensor([1, 2])), cfg.sampling, torch.Generator().manual_seed(0))
    cond = Cond(labels=torch.tensor([1, 2]))
    torch.testing.assert_close(again.log_probs(ids, cond, cfg.sampling), teacher.log_probs(ids, cond, cfg.sampling))
