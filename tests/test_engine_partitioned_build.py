"""Starting a worker without the whole teacher: the student template read from the teacher file equals the one
copied from a whole teacher, and the launch takes that path exactly when the teacher is partitioned from a file."""

from pathlib import Path

import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config import load_config
from dd2dist.launch.partitioned_models import student_from_teacher_checkpoint
from dd2dist.launch.ray_train import partition_at_build
from dd2dist.nets import StudentNet
from dd2dist.teachers import build_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = {"var": ROOT / "configs/experiments/smoke_var_torch.yaml",
        "llamagen": ROOT / "configs/experiments/smoke_llamagen_torch.yaml"}


NEIGHBOUR_PICKS = ("student.generator_output=categorical", "student.neighbour_picks=left_up",
                   "stage2.ode_init_steps=0", "compact_head.enabled=false")


@pytest.mark.parametrize("family,noise_input,posterior_head,extra", [
    ("var", "none", False, ()), ("var", "none", True, ()), ("var", "mlp", False, ()), ("llamagen", "none", False, ()),
    ("llamagen", "mlp", False, ()),
    ("llamagen", "mlp", True, ()),
    ("llamagen", "mlp", True, NEIGHBOUR_PICKS)])
def test_student_from_teacher_file_equals_the_copy_of_a_whole_teacher(family, noise_input, posterior_head, extra,
                                                                      tmp_path):
    cfg = load_config(TINY[family], ["teacher.official=null", f"student.noise_input={noise_input}",
                                     f"student.posterior_head={str(posterior_head).lower()}", *extra],
                      check_paths=False)
    torch.manual_seed(3)
    teacher = build_teacher(cfg.teacher)
    path = tmp_path / "teacher.pt"
    torch.save({"teacher": teacher.state_dict()}, path)

    torch.manual_seed(11)
    reference = StudentNet(teacher, cfg.student).float()
    torch.manual_seed(11)
    built = student_from_teacher_checkpoint(cfg.teacher, cfg.student, str(path))

    ref_state, built_state = reference.state_dict(), built.state_dict()
    assert set(ref_state) == set(built_state)
    for key, value in ref_state.items():
        if key.startswith(("backbone.", "code_logits.")):  # the posterior head's logits are the output layer
            assert torch.equal(built_state[key], value), key
        else:  # a fresh head: same layout, zero-initialised output, so it starts at v = 0 like the copy
            assert built_state[key].shape == value.shape, key
    assert not built.head.final.linear.weight.any() and not built.head.final.linear.bias.any()
    assert any(".vector_input." in key for key in built_state) == (noise_input == "mlp")
    assert ("code_logits.weight" in built_state) == posterior_head
    assert any(key.startswith("neighbour_picks.") for key in built_state) == bool(extra)
    seq = torch.randn(2, teacher.num_tokens, teacher.embed_dim, generator=torch.Generator().manual_seed(0))
    cond = Cond(labels=torch.tensor([0, 1]))
    with torch.no_grad():  # non-persistent buffers (masks, RoPE tables) were rebuilt
        assert torch.allclose(built.features(seq, cond), reference.features(seq, cond), atol=1e-6)
        assert torch.allclose(built.generate(seq, cond), reference.generate(seq, cond), atol=1e-6)


def test_student_from_teacher_file_names_a_missing_key(tmp_path):
    cfg = load_config(TINY["var"], ["teacher.official=null"], check_paths=False)
    state = build_teacher(cfg.teacher).state_dict()
    dropped = next(k for k in state if k.startswith("transformer."))
    del state[dropped]
    path = tmp_path / "teacher.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        student_from_teacher_checkpoint(cfg.teacher, cfg.student, str(path))


def test_partitioned_build_is_chosen_only_for_a_zero3_teacher_from_a_file():
    base = ["teacher.official=null", "engine.kind=deepspeed", "engine.zero_stage_teacher=3"]
    on_file = load_config(TINY["var"], [*base, "teacher.checkpoint=/x/teacher.pt"], check_paths=False)
    assert partition_at_build(on_file)
    for extra in (["teacher.checkpoint=null"], ["teacher.checkpoint=/x/t.pt", "engine.zero_stage_teacher=0"],
                  ["teacher.checkpoint=/x/t.pt", "engine.kind=torch"]):
        assert not partition_at_build(load_config(TINY["var"], [*base, *extra], check_paths=False)), extra
