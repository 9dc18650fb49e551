"""The text-to-image digits teacher: caption conditions with dropout to the null caption, and jobs/train_teacher.py
end to end on the quick recipe (PNG shards -> DALI -> tokens -> caption-conditioned AR -> prompt adherence),
sharing the tokenizer of its class-conditional counterpart."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dd2dist.config import load_config
from dd2dist.digits.ar_training import ar_loss, train_ar
from dd2dist.digits.caption_batches import caption_batches, encode_records
from dd2dist.digits.captions import caption_records
from dd2dist.digits.recipe import QUICK, TeacherRecipe
from dd2dist.digits.teacher_job import _cached_counterpart
from dd2dist.digits.text_teacher import counterpart_config
from dd2dist.teachers import build_family, build_teacher
from dd2dist.teachers.arch import LlamaGenConfig
from dd2dist.text import build_text_encoder

REPO = Path(__file__).resolve().parents[1]
T2I = REPO / "configs" / "teachers" / "digits_llamagen_t2i.yaml"
CLASS = REPO / "configs" / "teachers" / "digits_llamagen.yaml"
ENCODER = "hashed:slots=16,width=64,ngrams=1"


@pytest.fixture(scope="module")
def bank():
    records = [r for r in caption_records("train", seed=0, per_image=4) if r["index"] < 8]
    null = torch.full((16, 64), 0.5)
    return records, build_text_encoder(ENCODER), null


def test_caption_batches_draw_true_phrasings_and_drop_to_the_null_caption(bank):
    records, enc, null = bank
    kept = caption_batches(records, 8, enc, null, drop_prob=0.0)
    own = encode_records(records, enc)  # 4 consecutive records per image
    idx = torch.arange(8)
    seen = set()
    for step in range(6):
        cond = kept(idx, torch.Generator().manual_seed(step))
        for i in range(8):
            match = [k for k in range(4) if torch.equal(cond.text[i], own.text[4 * i + k])]
            assert match and torch.equal(cond.text_mask[i], own.text_mask[4 * i + match[0]])
            seen.add((i, match[0]))
    assert len(seen) > 8  # a new phrasing on later draws, not one fixed caption per image
    dropped = caption_batches(records, 8, enc, null, drop_prob=1.0)(idx, torch.Generator().manual_seed(0))
    assert torch.equal(dropped.text, null.expand(8, 16, 64))  # the null caption, with the caption's own mask
    assert all(any(torch.equal(dropped.text_mask[i], own.text_mask[4 * i + k]) for k in range(4)) for i in range(8))
    with pytest.raises(ValueError, match="lack images"):
        caption_batches(records, 9, enc, null, 0.1)


def test_caption_conditioned_training_lowers_the_loss(bank):
    records, enc, _ = bank
    torch.manual_seed(0)
    teacher = build_family("llamagen", llamagen=LlamaGenConfig(num_classes=0, cls_token_num=16, caption_dim=64))
    ids = torch.randint(0, teacher.vocab_size, (8, teacher.num_tokens), generator=torch.Generator().manual_seed(0))
    conds = caption_batches(records, 8, enc, teacher.null_cond(1).text[0], drop_prob=0.1)
    held = encode_records(records[::4], enc)
    before = ar_loss(teacher, ids, held).item()
    recipe = TeacherRecipe(ar_epochs=30, ar_batch_size=8, ar_lr=3e-3)
    info = train_ar(teacher, ids, conds, recipe, log=lambda s: None, heldout=(ids, held))
    assert info["heldout_ce"] < 0.5 * before


def _job():
    spec = importlib.util.spec_from_file_location("train_teacher_job", REPO / "jobs" / "train_teacher.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The quick t2i teacher twice: alone (it trains its tokenizer), and beside a cached class-conditional
    counterpart (it reuses that teacher's tokenizer)."""
    job = _job()
    alone, beside = tmp_path_factory.mktemp("alone"), tmp_path_factory.mktemp("beside")
    assert job.main(["--config", str(T2I), "--out", str(alone), "--quick"]) == 0
    assert job.main(["--config", str(CLASS), "--out", str(beside), "--quick", "--no-eval"]) == 0
    assert job.main(["--config", str(T2I), "--out", str(beside), "--quick", "--no-eval"]) == 0

    def reports(out):
        return {json.loads(p.read_text()).get("captions") is not None: json.loads(p.read_text())
                for p in out.glob("teacher-*.json")}
    return job, reports(alone)[True], reports(beside)


def test_quick_t2i_teacher_trains_through_the_real_path_and_reports_adherence(runs):
    _, rep, _ = runs
    assert rep["tokenisation"]["dali_vs_direct_ids"] == 1.0 and rep["ar"]["steps"] > 0
    assert rep["tokenizer"]["reused_from"] is None and rep["tokenizer"]["final_losses"]["rec"] > 0
    assert rep["captions"]["encoder"] == ENCODER and rep["captions"]["heldout_templates"]
    q = rep["quality"]
    for kind in ("seen", "heldout"):
        scores = q["prompt_adherence"][kind]
        assert scores["num_images"] == 60  # 10 classes x 2 thickness x 3 slant words
        assert 0.0 <= scores["class_accuracy"] <= 1.0 and set(scores["property_agreement"]) == {"thickness", "slant"}
    assert q["teacher"]["fid"] > 0 and q["teacher"]["sampling"]["per_class"] == QUICK.eval_per_class
    assert q["reference_adherence"]["heldout_digits"]["property_agreement_mean"] == 1.0


def test_t2i_checkpoint_loads_from_its_written_config_and_samples_from_captions(runs):
    _, rep, _ = runs
    cfg = load_config(rep["config"])
    assert cfg.teacher.checkpoint == rep["checkpoint"] and cfg.teacher.text_encoder == ENCODER
    teacher = build_teacher(cfg.teacher)
    cond = encode_records(caption_records("heldout", 0, 1)[:3], build_text_encoder(cfg.teacher.text_encoder))
    ids = teacher.sample(cond, cfg.teacher.sampling, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 16) and teacher.decode(ids).shape == (3, 3, 16, 16)


def test_the_tokenizer_is_the_class_conditional_counterparts_cached_or_not(runs):
    _, alone, beside = runs
    base, text = beside[False], beside[True]
    assert text["tokenizer"]["reused_from"] == base["checkpoint"]

    def tokenizer(path):
        state = torch.load(path, map_location="cpu", weights_only=True)["teacher"]
        return {k: v for k, v in state.items() if k.startswith("tokenizer.")}

    shared, cached = tokenizer(text["checkpoint"]), tokenizer(base["checkpoint"])
    trained = tokenizer(alone["checkpoint"])
    assert shared.keys() == cached.keys() and all(torch.equal(shared[k], cached[k]) for k in shared)
    assert all(torch.equal(trained[k], cached[k]) for k in shared)  # trained alone exactly as the counterpart does
    assert alone["key"] == text["key"]  # same inputs, same weights, same cache entry


def test_second_run_reuses_the_t2i_checkpoint(runs, tmp_path):
    job, rep, _ = runs
    out = Path(rep["checkpoint"]).parent
    mtime = Path(rep["checkpoint"]).stat().st_mtime_ns
    assert job.main(["--config", str(T2I), "--out", str(out), "--quick"]) == 0
    assert Path(rep["checkpoint"]).stat().st_mtime_ns == mtime


def test_a_counterpart_with_other_ar_settings_still_lends_its_tokenizer(runs):
    _, _, beside = runs
    base = beside[False]
    out = Path(base["checkpoint"]).parent
    cfg = counterpart_config(load_config(T2I))
    assert str(_cached_counterpart(out, cfg, replace(QUICK, ar_epochs=5))) == base["checkpoint"]
    assert _cached_counterpart(out, cfg, replace(QUICK, vq_epochs=2)) is None  # another tokenizer recipe
