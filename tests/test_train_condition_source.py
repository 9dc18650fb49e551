"""Caption banks: draws that are a pure function of (seed, rank, step, purpose), the first distinct captions of each
rank's share of the shards, and refusals (naming the shard or key) of captions the teacher cannot read."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from text_run_helpers import SLOTS, WIDTH, caption, text_config, text_teacher, write_text_shards

from dd2dist.config import ConfigError
from dd2dist.data import stream_from_config
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.launch.preflight import validate_captions, validate_data, validate_run
from dd2dist.train import Trainer
from dd2dist.train.condition_source import CaptionBank, CaptionDraws, ClassLabels, load_caption_bank

CPU = torch.device("cpu")


def _bank(indices) -> CaptionBank:
    pairs = [caption(i) for i in indices]
    return CaptionBank(np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs]))


def test_bank_draws_are_a_pure_function_of_seed_rank_step_and_purpose():
    bank = _bank(range(50))
    draws = CaptionDraws(bank, seed=3, rank=0, device=CPU)
    a = draws.draw(6, iteration=5, micro=0, purpose="generator/0/labels")
    again = CaptionDraws(bank, seed=3, rank=0, device=CPU).draw(6, iteration=5, micro=0, purpose="generator/0/labels")
    assert torch.equal(a.text, again.text) and torch.equal(a.text_mask, again.text_mask)
    assert a.text.dtype == torch.float32 and a.text.shape == (6, SLOTS, WIDTH) and a.text_mask.dtype == torch.bool
    for row in range(6):  # every row is one whole caption of the bank, text and mask together
        match = [(torch.equal(a.text[row], bank.text[i].float()) and torch.equal(a.text_mask[row], bank.mask[i]))
                 for i in range(len(bank))]
        assert sum(match) == 1
    others = [draws.draw(6, 6, 0, "generator/0/labels"), draws.draw(6, 5, 0, "guidance/0/labels"),
              CaptionDraws(bank, seed=3, rank=1, device=CPU).draw(6, 5, 0, "generator/0/labels"),
              CaptionDraws(bank, seed=4, rank=0, device=CPU).draw(6, 5, 0, "generator/0/labels")]
    for other in others:
        assert not torch.equal(other.text, a.text)


def test_grid_captions_are_the_first_of_the_bank():
    bank = _bank(range(3))
    first = CaptionDraws(bank, 0, 0, CPU).first(5)
    assert torch.equal(first.text, bank.text[[0, 1, 2, 0, 1]].float())


def test_bank_from_arrays_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="mask"):
        CaptionBank(np.zeros((2, SLOTS, WIDTH)), np.ones((2, SLOTS + 1), bool))
    with pytest.raises(ConfigError, match=f"teacher expects {SLOTS} x {WIDTH + 1}"):
        _bank(range(2)).check_layout(SLOTS, WIDTH + 1)


def test_each_rank_keeps_the_first_distinct_captions_of_its_own_shards(tmp_path):
    cfg = text_config(tmp_path)
    # shard 0 repeats caption 1; with 2 ranks, rank 0 reads shards 0 and 2, rank 1 shards 1 and 3
    shards = write_text_shards(tmp_path / "shards", cfg, [[0, 1, 1, 2], [10, 11], [3, 4], [12, 13]])
    rank0 = load_caption_bank(str(shards), 4, rank=0, world_size=2, text_shape=(SLOTS, WIDTH))
    rank1 = load_caption_bank(str(shards), 100, rank=1, world_size=2)
    assert torch.equal(rank0.text, _bank([0, 1, 2, 3]).text) and torch.equal(rank0.mask, _bank([0, 1, 2, 3]).mask)
    assert torch.equal(rank1.text, _bank([10, 11, 12, 13]).text)
    # two ranks of one run draw different captions at the same step
    a = CaptionDraws(rank0, cfg.seed, 0, CPU).draw(4, 0, 0, "generator/0/labels")
    b = CaptionDraws(rank1, cfg.seed, 1, CPU).draw(4, 0, 0, "generator/0/labels")
    assert not any(torch.equal(x, y) for x in a.text for y in b.text)


def test_fewer_shards_than_ranks_split_the_samples(tmp_path):
    cfg = text_config(tmp_path)
    shards = write_text_shards(tmp_path / "shards", cfg, [[0, 1, 2, 3, 4]])
    rank1 = load_caption_bank(str(shards), 10, rank=1, world_size=2)
    assert torch.equal(rank1.text, _bank([1, 3]).text)


def test_the_trainer_builds_a_caption_bank_from_data_captions(tmp_path):
    cfg = text_config(tmp_path, f"data.captions={write_text_shards(tmp_path / 's', text_config(tmp_path), [[0, 1]])}")
    trainer = Trainer(cfg, text_teacher(cfg), TorchEngineFactory())
    assert isinstance(trainer.batches.conditions, CaptionDraws) and len(trainer.batches.conditions.bank) == 2
    eps, cond = trainer.batches.stage2(0, 0, "generator")
    assert cond.text.shape == (3, SLOTS, WIDTH) and cond.labels is None


def test_a_text_teacher_without_captions_is_refused_naming_data_captions(tmp_path):
    cfg = text_config(tmp_path)
    with pytest.raises(ConfigError, match="data.captions"):
        validate_run(cfg)
    with pytest.raises(ConfigError, match="data.captions"):
        Trainer(cfg, text_teacher(cfg), TorchEngineFactory())
    with pytest.raises(ConfigError, match="data.caption_bank_size"):
        text_config(tmp_path, "data.caption_bank_size=0")
    class_cfg = text_config(tmp_path, "teacher.llamagen.num_classes=10", "teacher.llamagen.cls_token_num=1",
                            "teacher.llamagen.caption_dim=0", "teacher.text_encoder=null")
    assert validate_captions(class_cfg) is None  # labels need no captions
    assert isinstance(Trainer(class_cfg, text_teacher(class_cfg), TorchEngineFactory()).batches.conditions,
                      ClassLabels)


@pytest.mark.parametrize("text_shape, what", [((SLOTS, WIDTH + 4), "width"), ((SLOTS - 1, WIDTH), "mask length")])
def test_shards_of_another_caption_layout_are_refused_naming_the_shard(tmp_path, caplog, text_shape, what):
    cfg = text_config(tmp_path)
    good = write_text_shards(tmp_path / "mixed", cfg, [[0, 1, 2, 3]])
    bad = write_text_shards(tmp_path / "bad", cfg, [[5, 6]], text_shape=text_shape)
    bad_shard = str(next(bad.glob("*.tar")))
    # the caption bank and the pre-launch check of data.captions
    with pytest.raises(ConfigError, match="data.captions") as err:
        load_caption_bank(str(bad), 8, text_shape=(SLOTS, WIDTH))
    assert bad_shard in str(err.value) and "text_shape" in str(err.value)
    cfg_bad = text_config(tmp_path, f"data.captions={bad}")
    with pytest.raises(ConfigError, match="data.captions") as err:
        validate_captions(cfg_bad)
    assert bad_shard in str(err.value) and f"{text_shape[0]} slots x {text_shape[1]}" in str(err.value)
    # the pre-launch check of stage-1 shards
    cfg_shards = text_config(tmp_path, "data.source=shards", f"data.shards={bad}")
    with pytest.raises(ConfigError, match="data.shards") as err:
        validate_data(cfg_shards)
    assert bad_shard in str(err.value) and "text_shape" in str(err.value)
    # the training stream: a mixed set keeps the good shard and refuses the other by name
    for p in bad.iterdir():
        p.rename(good / f"bad-{p.name}")
    bad_shard = str(good / f"bad-{os.path.basename(bad_shard)}")
    cfg_mixed = text_config(tmp_path, "data.source=shards", f"data.shards={good}", "data.batch_size=2")
    stream = stream_from_config(cfg_mixed, num_tokens=16)
    with caplog.at_level(logging.WARNING, logger="dd2dist.data"):
        batches = [b for _, b in zip(range(6), stream)]
    assert all(b.text.shape == (2, SLOTS, WIDTH) for b in batches)
    assert stream.metrics()["data/shards_refused"] >= 1
    assert any(bad_shard in r.getMessage() and "text_shape" in r.getMessage() for r in caplog.records)


def test_class_conditional_shards_are_not_a_caption_source(tmp_path):
    from dd2dist.data.synthetic import random_spec, write_random_shards

    write_random_shards(tmp_path / "cls", random_spec(num_tokens=16), 4, 4)
    with pytest.raises(ConfigError, match="cond"):
        load_caption_bank(str(tmp_path / "cls"), 8)


def test_a_caption_set_directory_is_a_caption_source(tmp_path):
    """A directory with captions.json (jobs/encode_captions.py's output) is read as a caption set: rank r of W
    holds its rows r::W, distinct, in key order; a bank of another layout is refused naming data.captions."""
    import json

    from dd2dist.data.caption_shards import CAPTIONS_JSON, caption_sample, read_caption_shards, write_caption_shard
    from dd2dist.text import HashedNgramEncoder

    enc = HashedNgramEncoder(slots=8, width=16)
    captions = [f"a {w} digit {d}" for w in ("thin", "bold", "small") for d in ("zero", "one", "two")]
    text, mask = enc.encode(captions)
    write_caption_shard(tmp_path, 0, [caption_sample(f"c{i:03d}", c, text[i].numpy(), mask[i].numpy(), {}, (8, 16))
                                      for i, c in enumerate(captions)])
    (tmp_path / CAPTIONS_JSON).write_text(json.dumps({"encoder": enc.name, "text_shape": [8, 16], "complete": True,
                                                      "count": len(captions), "shards": ["captions-000000.tar"]}))
    cs = read_caption_shards(tmp_path)
    banks = [load_caption_bank(str(tmp_path), 100, rank=r, world_size=2, text_shape=(8, 16)) for r in range(2)]
    assert [len(b) for b in banks] == [5, 4]
    for r, bank in enumerate(banks):
        rows = bank.rows(torch.arange(len(bank)), "cpu")
        assert torch.equal(rows.text, torch.from_numpy(cs.text[r::2].astype(np.float32)))
        assert torch.equal(rows.text_mask, torch.from_numpy(cs.mask[r::2]))
    assert len(load_caption_bank(str(tmp_path), 3)) == 3  # the first distinct ones up to the bank size
    with pytest.raises(ConfigError, match="data.captions"):
        load_caption_bank(str(tmp_path), 8, text_shape=(8, 32))
