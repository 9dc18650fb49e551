"""Text encoders: the hashed n-gram encoder, and the T5 encoder on a tiny randomly initialised T5 saved to disk."""

import pytest
import torch

from dd2dist.text import HashedNgramEncoder, build_text_encoder, text_encoder_identity

WORDS = ["a", "the", "digit", "zero", "one", "two", "three", "thin", "thick", "bold", "small", "large", "centred"]


def test_hashed_encoder_is_deterministic_across_instances():
    caps = ["a thin digit one", "the bold digit zero", ""]
    f1, m1 = HashedNgramEncoder(slots=8, width=16).encode(caps)
    f2, m2 = build_text_encoder("hashed:slots=8,width=16").encode(caps)
    assert f1.shape == (3, 8, 16) and m1.shape == (3, 8) and f1.dtype == torch.float32
    assert torch.equal(f1, f2) and torch.equal(m1, m2)
    assert m1.sum(1).tolist() == [4, 4, 0]
    assert not m1[0, :4].any() and m1[0, 4:].all()  # left-padded: valid slots last
    assert (f1[0, :4] == 0).all() and (f1[2] == 0).all()
    other_seed, _ = HashedNgramEncoder(slots=8, width=16, seed=1).encode(caps)
    assert not torch.allclose(other_seed[0], f1[0])


def test_hashed_encoder_word_order_matters_through_bigrams():
    enc = HashedNgramEncoder(slots=8, width=16)
    (a, b), _ = enc.encode(["thin one", "one thin"])
    assert not torch.allclose(a.sum(0), b.sum(0))  # same words, other order: other bigrams
    (c, d), _ = enc.encode(["Thin, ONE!", "thin one"])
    assert torch.equal(c, d)  # case and punctuation carry nothing


def test_hashed_encoder_truncates_long_captions_to_their_first_words():
    enc = HashedNgramEncoder(slots=4, width=8)
    (long_,), (mask,) = enc.encode(["one two three four five six"])
    (first,), _ = enc.encode(["one two three four"])
    assert mask.all() and torch.equal(long_, first)


@pytest.mark.parametrize("spec, match", [
    ("hashed:slots=8,depth=3", "depth"),
    ("hashed:slots", "slots"),
    ("hashed:slots=x", "not an integer"),
    ("hashed:slots=0", "slots > 0"),
    ("bert:/x", "unknown kind"),
    ("t5:", "directory is missing"),
    ("t5:/x,width=3", "width"),
])
def test_bad_specs_are_refused_naming_the_part(spec, match):
    with pytest.raises(ValueError, match=match):
        build_text_encoder(spec)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A randomly initialised 1-layer T5 encoder and a word-level tokenizer (with </s> appended), saved like a
    downloaded checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    directory = tmp_path_factory.mktemp("tiny-t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=len(vocab) + 3,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(cfg).eval()
    model.save_pretrained(directory)
    return directory, model, fast


def test_t5_encoder_matches_the_model_on_the_valid_tokens(tiny_t5):
    directory, model, tokenizer = tiny_t5
    enc = build_text_encoder(f"t5:{directory},slots=8")
    caps = ["a thin digit one", "the digit zero", "one two three four five six seven eight nine"]
    feats, mask = enc.encode(caps)
    assert feats.shape == (3, 8, 32) and mask.shape == (3, 8) and feats.dtype == torch.float32
    assert mask.sum(1).tolist() == [5, 4, 8]  # words + </s>; the long one truncated to 8 tokens
    for b, cap in enumerate(caps):
        n = int(mask[b].sum())
        assert not mask[b, : 8 - n].any() and (feats[b, : 8 - n] == 0).all()
        ids = tokenizer(cap, max_length=8, truncation=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            alone = model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(feats[b, 8 - n :], alone, atol=1e-5, rtol=1e-5)
    again, _ = build_text_encoder(f"t5:{directory},slots=8").encode(caps)
    assert torch.equal(again, feats)
    name, slots, width = text_encoder_identity(f"t5:{directory},slots=8")
    assert enc.name == name and name.startswith("t5:") and name.endswith(f"{directory.name},slots=8")
    assert (slots, width) == (8, 32) and enc.width == 32


def test_t5_directory_problems_name_what_is_missing(tiny_t5, tmp_path):
    import shutil

    directory, _, _ = tiny_t5
    with pytest.raises(ValueError, match="does not exist"):
        build_text_encoder(f"t5:{tmp_path / 'nowhere'}")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(directory, no_weights)
    for p in no_weights.glob("*.safetensors"):
        p.unlink()
    with pytest.raises(ValueError, match=r"no_weights.*lacks weights \(\*\.safetensors"):
        build_text_encoder(f"t5:{no_weights}")
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(directory, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no_tokenizer.*lacks tokenizer files"):
        build_text_encoder(f"t5:{no_tok}")
    (no_tok / "config.json").unlink()
    with pytest.raises(ValueError, match="lacks config.json, tokenizer files"):
        text_encoder_identity(f"t5:{no_tok},slots=8")


def test_hashed_unigram_features_carry_a_word_into_a_new_phrasing_unchanged():
    uni = build_text_encoder("hashed:slots=8,width=16,ngrams=1")
    assert isinstance(uni, HashedNgramEncoder) and uni.name.endswith(",ngrams=1")
    a, _ = uni.encode(["a thick seven"])
    b, _ = uni.encode(["look at this seven"])
    assert torch.equal(a[0, -1], b[0, -1])  # "seven" after another word: the same vector
    bi = build_text_encoder("hashed:slots=8,width=16")
    a, _ = bi.encode(["a thick seven"])
    b, _ = bi.encode(["look at this seven"])
    assert not torch.equal(a[0, -1], b[0, -1])  # with bigrams it depends on the word before
    with pytest.raises(ValueError, match="ngrams"):
        build_text_encoder("hashed:ngrams=3")
