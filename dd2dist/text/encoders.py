"""Text encoders: a list of captions -> left-padded per-slot features (B, T, Dt) and a validity mask (B, T).

LlamaGen's text-to-image teacher reads ``T`` caption slots of ``Dt``-wide features, left-padded: a caption of n
tokens fills the LAST n slots and the mask marks them valid (the teacher's attention ignores the other slots).
Every encoder here returns exactly that layout, so the shards, the teacher and the distillation never need to know
which encoder made the features. Features are fp32 here; the shards store them as float16.

* :class:`HashedNgramEncoder` needs no downloaded weights: each word's feature is the sum of fixed pseudo-random
  vectors of its unigram and of the bigram it ends, seeded by a stable hash of the text. It is deterministic across
  machines and processes, costs nothing to "train", and keeps word identity and local word order, which is what a
  small teacher needs to follow captions made of a few content words. Unknown words get their own vectors, so a
  held-out phrasing shares the features of the content words it has in common with seen phrasings.
* ``T5TextEncoder`` (``dd2dist.text.t5``) is the real encoder of LlamaGen-t2i (FLAN-T5-XL), loaded from a local
  directory.
"""

from __future__ import annotations

import abc
import hashlib
import re

import numpy as np
import torch
from torch import Tensor


def left_pad(rows: list[Tensor], slots: int, width: int) -> tuple[Tensor, Tensor]:
    """Per-caption token features [(n_i, Dt)] -> (B, slots, Dt) fp32 and mask (B, slots) bool, left-padded.

    A caption longer than ``slots`` keeps its FIRST ``slots`` tokens (as LlamaGen truncates its T5 input); padded
    slots hold zeros.
    """
    out = torch.zeros(len(rows), slots, width, dtype=torch.float32)
    mask = torch.zeros(len(rows), slots, dtype=torch.bool)
    for b, r in enumerate(rows):
        r = r[:slots]
        n = r.shape[0]
        if n:
            out[b, slots - n :] = r.float()
            mask[b, slots - n :] = True
    return out, mask


class TextEncoder(abc.ABC):
    """Captions -> (features (B, slots, width) fp32, mask (B, slots) bool), left-padded.

    Attributes:
        name: what made the features (recorded in shard metadata, so another encoder's shards are refused).
        slots: T, caption slots (the teacher's ``cls_token_num``).  width: Dt (the teacher's ``caption_dim``).
    """

    name: str
    slots: int
    width: int

    @abc.abstractmethod
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Features and mask of ``captions`` (see the module docstring for the layout)."""


_WORD = re.compile(r"[a-z0-9]+")


def words(caption: str) -> list[str]:
    """Lower-case alphanumeric words of a caption (punctuation and case carry no meaning here)."""
    return _WORD.findall(caption.lower())


class HashedNgramEncoder(TextEncoder):
    """Fixed hashed n-gram features; see the module docstring. ``seed`` changes every vector.

    ``ngrams=2`` (default) adds to each word the vector of the bigram it ends, so word order is in the features;
    ``ngrams=1`` keeps the unigram alone. With bigrams, a content word after a filler word it never followed in
    training gets a half-new vector, which is what a held-out phrasing does to it; unigram features leave the
    order to the slot positions the teacher sees, and carry a known word into a new phrasing unchanged.
    """

    def __init__(self, slots: int = 16, width: int = 64, seed: int = 0, ngrams: int = 2):
        if slots <= 0 or width <= 0:
            raise ValueError(f"HashedNgramEncoder needs slots > 0 and width > 0, got {slots}, {width}")
        if ngrams not in (1, 2):
            raise ValueError(f"HashedNgramEncoder: ngrams must be 1 or 2, got {ngrams}")
        self.slots, self.width, self.seed, self.ngrams = int(slots), int(width), int(seed), int(ngrams)
        self.name = f"hashed-ngram:slots={self.slots},width={self.width},seed={self.seed}" + (
            f",ngrams={self.ngrams}" if self.ngrams != 2 else "")
        self._cache: dict[str, Tensor] = {}

    def _vector(self, gram: str) -> Tensor:
        v = self._cache.get(gram)
        if v is None:
            digest = hashlib.blake2b(f"{self.seed}\x00{gram}".encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(digest, "little"))
            v = torch.from_numpy(rng.standard_normal(self.width).astype(np.float32) / np.sqrt(self.width))
            self._cache[gram] = v
        return v

    def token_features(self, caption: str) -> Tensor:
        """(n_words, width): unigram vector (+ the vector of the bigram ending at that word, with ``ngrams=2``)."""
        ws = words(caption)
        if self.ngrams == 1:
            feats = [self._vector(w) for w in ws]
        else:
            feats = [self._vector(w) + self._vector(f"{prev} {w}") for prev, w in zip(["<s>"] + ws[:-1], ws)]
        return torch.stack(feats) if feats else torch.zeros(0, self.width)

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return left_pad([self.token_features(c) for c in captions], self.slots, self.width)


def parse_text_encoder_spec(spec: str) -> tuple[str, str | None, dict[str, int]]:
    """``spec`` -> (kind, T5 directory or None, integer options); ValueError naming the spec on anything else."""
    kind, _, rest = spec.partition(":")
    if kind == "hashed":
        path, opts, allowed, form = None, rest.split(","), ("slots", "width", "seed", "ngrams"), \
            "hashed:slots=N,width=N,seed=N,ngrams=1|2"
    elif kind == "t5":
        path, *opts = rest.split(",")
        allowed, form = ("slots",), "t5:<dir>[,slots=N]"
        if not path:
            raise ValueError(f"text encoder spec {spec!r}: expected {form}, the directory is missing")
    else:
        raise ValueError(f"text encoder spec {spec!r}: unknown kind {kind!r} (expected 'hashed' or 't5:<dir>')")
    kw = {}
    for part in filter(None, opts):
        k, sep, v = part.partition("=")
        if not sep or k not in allowed:
            raise ValueError(f"text encoder spec {spec!r}: expected {form}, got {part!r}")
        try:
            kw[k] = int(v)
        except ValueError:
            raise ValueError(f"text encoder spec {spec!r}: {k}={v!r} is not an integer") from None
    return kind, path, kw


def build_text_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """An encoder from a spec string: ``hashed[:slots=16,width=64,seed=0,ngrams=2]`` or
    ``t5:<local directory>[,slots=120]``.

    The T5 directory must hold a ``transformers`` T5 encoder checkpoint and its tokenizer; nothing is downloaded.
    ``device`` places a network encoder (T5); the hashed encoder is a table lookup and ignores it. It is not part of
    the spec because the spec names the features (recorded in the shards), and the device does not change them
    beyond floating-point rounding.
    """
    kind, path, kw = parse_text_encoder_spec(spec)
    if kind == "hashed":
        return HashedNgramEncoder(**kw)
    from dd2dist.text.t5 import T5TextEncoder

    return T5TextEncoder(path, device=device, **kw)


def text_encoder_identity(spec: str) -> tuple[str, int, int]:
    """(name, slots, width) of the encoder ``spec`` builds, without loading any weights (a driver checks an output
    directory against it before starting workers that each load the encoder)."""
    kind, path, kw = parse_text_encoder_spec(spec)
    if kind == "hashed":
        enc = HashedNgramEncoder(**kw)
        return enc.name, enc.slots, enc.width
    from dd2dist.text.t5 import t5_identity

    slots = kw.get("slots", 120)
    name, width = t5_identity(path, slots)
    return name, slots, width


def text_encoder_geometry(spec: str) -> tuple[int | None, int | None]:
    """(slots, width) a spec will produce, without loading weights or reading files: what config validation compares
    against the teacher's ``cls_token_num`` / ``caption_dim``. ``None`` where only the model knows (a T5 width, or
    its slots when the spec does not set them). Raises ValueError for a malformed spec."""
    kind, _, kw = parse_text_encoder_spec(spec)
    if kind == "hashed":
        enc = HashedNgramEncoder(**kw)  # a seed and two sizes: nothing is loaded
        return enc.slots, enc.width
    return kw.get("slots"), None
