"""teacher.text_encoder: required by our own text teachers, matched to their caption slots, refused elsewhere; the
class-conditional digits teachers keep their cache keys."""

from pathlib import Path

import pytest

from dd2dist.config import ConfigError, load_config
from dd2dist.digits.recipe import FULL, QUICK
from dd2dist.digits.teacher_job import cache_key
from dd2dist.text import text_encoder_geometry

REPO = Path(__file__).resolve().parents[1]
T2I = REPO / "configs" / "teachers" / "digits_llamagen_t2i.yaml"
CLASS = REPO / "configs" / "teachers" / "digits_llamagen.yaml"


def test_the_digits_t2i_config_loads_with_its_encoder():
    cfg = load_config(T2I)
    arch = cfg.teacher.arch
    assert (arch.num_classes, arch.cls_token_num, arch.caption_dim) == (0, 16, 64)
    assert cfg.teacher.text_encoder == "hashed:slots=16,width=64,ngrams=1"
    base = load_config(CLASS)  # everything but the condition is the class-conditional digits teacher
    for name in ("n_layer", "n_head", "dim", "grid", "tokenizer"):
        assert getattr(arch, name) == getattr(base.teacher.arch, name)


@pytest.mark.parametrize("overrides, message", [
    (["teacher.text_encoder=null"], "must be set for a text-conditional teacher"),
    (["teacher.text_encoder=hashed:slots=8,width=64"], "8 caption slots but the teacher's cls_token_num is 16"),
    (["teacher.text_encoder=hashed:slots=16,width=32"], "32-wide features but the teacher's caption_dim is 64"),
    (["teacher.text_encoder=t5:/models/t5,slots=120"], "120 caption slots"),
    (["teacher.text_encoder=hashed:depth=3"], "expected hashed:slots=N"),
    (["teacher.text_encoder=clip:/x"], "unknown kind 'clip'"),
])
def test_bad_text_encoders_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(T2I, overrides)
    assert err.value.key == "teacher.text_encoder"


def test_a_class_teacher_refuses_a_text_encoder():
    with pytest.raises(ConfigError, match="class-conditional") as err:
        load_config(CLASS, ["teacher.text_encoder=hashed:slots=1,width=64"])
    assert err.value.key == "teacher.text_encoder"


def test_the_released_t2i_model_may_omit_its_encoder():
    cfg = load_config(REPO / "configs" / "teachers" / "llamagen_t2i_xl.yaml", check_paths=False)
    assert cfg.teacher.text_encoder is None


def test_encoder_geometry_is_read_without_loading_weights():
    assert text_encoder_geometry("hashed") == (16, 64)
    assert text_encoder_geometry("hashed:slots=5,width=16,seed=3") == (5, 16)
    assert text_encoder_geometry("t5:/nowhere") == (None, None)  # only the loaded model knows its width
    assert text_encoder_geometry("t5:/nowhere,slots=120") == (120, None)


def test_class_teacher_cache_keys_are_unchanged():
    # the checkpoints cached under these keys are reused by the demo: a new teacher field must not move them
    assert cache_key(load_config(CLASS), FULL) == "f24910b40f52729a"
    assert cache_key(load_config(REPO / "configs" / "teachers" / "digits_var.yaml"), FULL) == "0e672bdcaba3072e"
    assert cache_key(load_config(T2I), FULL) != cache_key(load_config(T2I), QUICK)
    assert cache_key(load_config(T2I), FULL) != cache_key(
        load_config(T2I, ["teacher.text_encoder=hashed:slots=16,width=64,seed=1"]), FULL)
