"""The token-shard sample schema and its codec (format: docs/scaling.md §4).

A sample is the set of tar members ``<key>.<component>``:

* ``tokens.tok16``  headerless little-endian int16 token ids, C order, shape ``meta.json:token_shape``
  (int16 so DALI can read it too; every supported vocabulary is < 32768).
* ``cond.cls``      the class label as ASCII digits, and ``label.i64``, the same label as one little-endian
  int64 (DALI returns ``.cls`` text as raw bytes, so readers that go through DALI use ``label.i64``), or
* ``text.f16``      little-endian float16 text features, shape ``meta.json:text_shape`` (T, Dt), and
  ``text_mask.u8``  one byte per text slot, 1 = valid.
* ``meta.json``     everything needed to interpret the sample without outside knowledge: schema version,
  teacher id, family, token layout and shape, vocabulary size, condition kind, the sampling settings that
  produced it (CFG, schedule, top-k, top-p, temperature; ``null`` for real-image tokens), and the seed and
  index of the sample; for samples conditioned on a caption of a caption set (``dd2dist.data.caption_shards``),
  ``caption_key``, the key of that caption (an optional field: readers that do not know it ignore it).

Every sample of a shard set shares one :class:`ShardSpec`; the per-sample part is the seed and index.
Decoding validates everything and raises :class:`SampleError` naming the key and the field, so the reader
can skip a bad sample with a precise log line instead of training on wrong data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np

from dd2dist.conditions import Sampling

SCHEMA_VERSION = 1

TOKENS = "tokens.tok16"
COND_CLS = "cond.cls"
LABEL_I64 = "label.i64"
TEXT = "text.f16"
TEXT_MASK = "text_mask.u8"
META = "meta.json"

TOKEN_DTYPE = np.dtype("<i2")
LABEL_DTYPE = np.dtype("<i8")
TEXT_DTYPE = np.dtype("<f2")
INT16_LIMIT = 1 << 15

# WebDataset and DALI's index format split a member name at the first dot and the index at spaces, so a key is
# restricted to characters that survive both.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_COND_KINDS = ("class", "text")
_SOURCES = ("teacher", "real")
_SAMPLING_FIELDS = ("guidance_scale", "guidance_schedule", "top_k", "top_p", "temperature")


class SampleError(ValueError):
    """A sample that cannot be used: names the sample key, the offending field and the reason."""

    def __init__(self, key: str, field_name: str, reason: str, kind: str = "invalid"):
        self.key = key
        self.field = field_name
        self.reason = reason
        self.kind = kind  # a short counter name: missing_component, bad_shape, out_of_range, bad_meta, ...
        super().__init__(f"sample {key!r}: {field_name}: {reason}")


class TeacherMismatch(SampleError):
    """The sample was produced by another teacher than the one expected: the whole shard is refused."""

    def __init__(self, key: str, found: str, expected: str):
        super().__init__(key, f"{META}:teacher_id", f"teacher {found!r} != expected {expected!r}", "teacher_mismatch")
        self.found = found
        self.expected = expected


def check_key(key: Any) -> str:
    """Return ``key`` if it is a usable sample key (letters, digits, ``_``, ``-``), else raise ValueError."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"__key__ must be a non-empty string of [A-Za-z0-9_-] (no dots or spaces), got {key!r}")
    return key


@dataclass(frozen=True)
class ShardSpec:
    """What every sample of a shard set shares; written into each sample's ``meta.json``.

    ``teacher_id`` identifies the teacher (weights + tokenizer) whose codebook the ids index; a reader refuses
    shards of another teacher. ``layout`` says how the flat tokens map to the image (e.g. ``"var:1,2,3"`` for
    VAR scales concatenated row-major, ``"raster:16x16"`` for LlamaGen). ``sampling`` holds the teacher's
    sampling settings for teacher samples and is ``None`` for tokens of real images.
    """

    teacher_id: str
    family: str
    vocab_size: int
    token_shape: tuple[int, ...]
    cond: str = "class"
    num_classes: int = 0
    text_shape: tuple[int, int] | None = None
    source: str = "teacher"
    layout: str = ""
    sampling: dict | None = field(default=None, compare=True)

    def __post_init__(self):
        object.__setattr__(self, "token_shape", tuple(int(s) for s in self.token_shape))
        if self.text_shape is not None:
            object.__setattr__(self, "text_shape", tuple(int(s) for s in self.text_shape))
        if not self.teacher_id or not isinstance(self.teacher_id, str):
            raise ValueError(f"ShardSpec.teacher_id must be a non-empty string, got {self.teacher_id!r}")
        if not 1 < int(self.vocab_size) <= INT16_LIMIT:
            raise ValueError(f"ShardSpec.vocab_size must be in [2, {INT16_LIMIT}] (int16 ids), got {self.vocab_size}")
        if not self.token_shape or any(s <= 0 for s in self.token_shape):
            raise ValueError(f"ShardSpec.token_shape must be non-empty and positive, got {self.token_shape}")
        if self.cond not in _COND_KINDS:
            raise ValueError(f"ShardSpec.cond must be one of {_COND_KINDS}, got {self.cond!r}")
        if self.cond == "class" and int(self.num_classes) <= 0:
            raise ValueError(f"ShardSpec.num_classes must be > 0 for class-conditional shards, got {self.num_classes}")
        if self.cond == "text" and (self.text_shape is None or len(self.text_shape) != 2 or min(self.text_shape) <= 0):
            raise ValueError(f"ShardSpec.text_shape must be (T, Dt) > 0 for text shards, got {self.text_shape}")
        if self.source not in _SOURCES:
            raise ValueError(f"ShardSpec.source must be one of {_SOURCES}, got {self.source!r}")
        if self.sampling is not None:
            missing = [k for k in _SAMPLING_FIELDS if k not in self.sampling]
            if missing:
                raise ValueError(f"ShardSpec.sampling lacks {missing}")

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_shape)

    def to_meta(self, seed: int | None = None, index: int | None = None) -> dict:
        """The ``meta.json`` dict of one sample of this spec."""
        meta = {"schema_version": SCHEMA_VERSION, **asdict(self), "seed": seed, "index": index}
        meta["token_shape"] = list(self.token_shape)
        meta["text_shape"] = None if self.text_shape is None else list(self.text_shape)
        return meta

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], key: str = "?") -> ShardSpec:
        """Parse the shared part of a ``meta.json`` dict; errors name the key and field."""
        if not isinstance(meta, Mapping):
            raise SampleError(key, META, f"expected a JSON object, got {type(meta).__name__}", "bad_meta")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SampleError(key, f"{META}:schema_version", f"{version!r} != supported {SCHEMA_VERSION}", "bad_meta")
        kwargs = {}
        for f in fields(cls):
            if f.name in meta:
                kwargs[f.name] = meta[f.name]
                if f.name == "sampling" and isinstance(meta[f.name], Mapping):
                    kwargs[f.name] = current_sampling_names(meta[f.name])
            elif f.default is MISSING and f.default_factory is MISSING:
                raise SampleError(key, f"{META}:{f.name}", "missing", "bad_meta")
            # else: an optional field, left at its default
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise SampleError(key, META, str(e), "bad_meta") from e


def current_sampling_names(settings: Mapping[str, Any]) -> dict:
    """Stored sampling settings with the fields :class:`Sampling` renamed since under their current names, so
    that shards and manifests written before a rename still read and compare equal."""
    return {Sampling.RENAMED_KEYS.get(k, k): v for k, v in settings.items()}


def sampling_dict(sampling: Any) -> dict:
    """The five sampling settings of a :class:`dd2dist.conditions.Sampling` (or a dict) as a plain dict."""
    if isinstance(sampling, Mapping):
        src = current_sampling_names(sampling)
    else:
        src = {k: getattr(sampling, k) for k in _SAMPLING_FIELDS}
    return {k: src[k] for k in _SAMPLING_FIELDS}


@dataclass
class TokenSample:
    """One decoded sample: token ids (int64, ``spec.token_shape``) and its condition."""

    key: str
    tokens: np.ndarray
    spec: ShardSpec
    label: int | None = None
    text: np.ndarray | None = None  # (T, Dt) float32
    text_mask: np.ndarray | None = None  # (T,) bool
    seed: int | None = None
    index: int | None = None
    caption_key: str | None = None  # the caption set key of the text condition, when it came from one


def _check_tokens(key: str, tokens: np.ndarray, spec: ShardSpec) -> None:
    if tuple(tokens.shape) != spec.token_shape:
        raise SampleError(key, TOKENS, f"shape {tuple(tokens.shape)} != {spec.token_shape}", "bad_shape")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= spec.vocab_size):
        raise SampleError(
            key, TOKENS, f"ids outside [0, {spec.vocab_size}): min {int(tokens.min())}, max {int(tokens.max())}",
            "out_of_range",
        )


def _check_label(key: str, label: int, spec: ShardSpec, field_name: str) -> None:
    if not 0 <= label < spec.num_classes:
        raise SampleError(key, field_name, f"label {label} outside [0, {spec.num_classes})", "out_of_range")


def encode_sample(sample: TokenSample) -> dict[str, Any]:
    """Validate ``sample`` against its spec and return the WebDataset dict (``__key__`` + bytes members)."""
    key, spec = sample.key, sample.spec
    try:
        check_key(key)
    except ValueError as e:
        raise SampleError(str(key), "__key__", str(e), "bad_key") from e
    tokens = np.asarray(sample.tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise SampleError(key, TOKENS, f"dtype {tokens.dtype} is not an integer type", "bad_dtype")
    _check_tokens(key, tokens, spec)
    out: dict[str, Any] = {"__key__": key, TOKENS: np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()}
    if spec.cond == "class":
        if sample.label is None or sample.text is not None:
            raise SampleError(key, "label", "a class-conditional sample needs a label and no text", "missing_component")
        label = int(sample.label)
        _check_label(key, label, spec, "label")
        out[COND_CLS] = str(label).encode("ascii")
        out[LABEL_I64] = np.asarray([label], dtype=LABEL_DTYPE).tobytes()
    else:
        if sample.text is None or sample.text_mask is None:
            raise SampleError(key, TEXT, "a text-conditional sample needs text and text_mask", "missing_component")
        text, mask = np.asarray(sample.text), np.asarray(sample.text_mask)
        if tuple(text.shape) != spec.text_shape:
            raise SampleError(key, TEXT, f"shape {tuple(text.shape)} != {spec.text_shape}", "bad_shape")
        if not np.issubdtype(text.dtype, np.floating) or not np.isfinite(text).all():
            raise SampleError(key, TEXT, f"must be finite floats, got dtype {text.dtype}", "bad_value")
        if tuple(mask.shape) != spec.text_shape[:1]:
            raise SampleError(key, TEXT_MASK, f"shape {tuple(mask.shape)} != {spec.text_shape[:1]}", "bad_shape")
        if not np.isin(mask, (0, 1)).all():
            raise SampleError(key, TEXT_MASK, "values must be 0 or 1", "bad_value")
        out[TEXT] = np.ascontiguousarray(text, dtype=TEXT_DTYPE).tobytes()
        out[TEXT_MASK] = np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    meta = spec.to_meta(sample.seed, sample.index)
    if sample.caption_key is not None:
        meta["caption_key"] = str(sample.caption_key)
    out[META] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return out


def _component(raw: Mapping[str, Any], key: str, name: str) -> bytes:
    if name not in raw:
        raise SampleError(key, name, "missing", "missing_component")
    return bytes(raw[name])


def _check_expected(key: str, spec: ShardSpec, expect: Mapping[str, Any]) -> None:
    for name, want in expect.items():
        if want is None:
            continue
        if name == "teacher_id":
            if spec.teacher_id != want:
                raise TeacherMismatch(key, spec.teacher_id, want)
            continue
        if name == "num_tokens":
            have = spec.num_tokens
        elif name in {f.name for f in fields(ShardSpec)}:
            have = getattr(spec, name)
            want = tuple(want) if isinstance(want, list) else want
        else:
            raise ValueError(f"unknown expectation {name!r}; use num_tokens or a ShardSpec field")
        if have != want:
            raise SampleError(key, f"{META}:{name}", f"{have!r} != expected {want!r}", "spec_mismatch")


def decode_sample(raw: Mapping[str, Any], expect: Mapping[str, Any] | None = None) -> TokenSample:
    """Decode and validate one sample dict (member suffix -> bytes, plus ``__key__``).

    ``expect`` maps :class:`ShardSpec` field names (or ``num_tokens``) to required values; a different
    ``teacher_id`` raises :class:`TeacherMismatch`, any other difference or defect :class:`SampleError`.
    """
    key = str(raw.get("__key__", "?"))
    try:
        meta = json.loads(_component(raw, key, META).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(key, META, f"not valid JSON: {e}", "bad_meta") from e
    spec = ShardSpec.from_meta(meta, key)
    if expect:
        _check_expected(key, spec, expect)

    tok_bytes = _component(raw, key, TOKENS)
    if len(tok_bytes) != 2 * spec.num_tokens:
        raise SampleError(
            key, TOKENS, f"{len(tok_bytes)} bytes, expected {2 * spec.num_tokens} for shape {spec.token_shape}",
            "bad_shape",
        )
    tokens = np.frombuffer(tok_bytes, dtype=TOKEN_DTYPE).astype(np.int64).reshape(spec.token_shape)
    _check_tokens(key, tokens, spec)
    sample = TokenSample(key=key, tokens=tokens, spec=spec, seed=meta.get("seed"), index=meta.get("index"),
                         caption_key=meta.get("caption_key"))

    if spec.cond == "class":
        label_i64 = raw.get(LABEL_I64)
        label_cls = raw.get(COND_CLS)
        if label_i64 is None and label_cls is None:
            raise SampleError(key, f"{LABEL_I64}|{COND_CLS}", "missing", "missing_component")
        label = None
        if label_i64 is not None:
            if len(label_i64) != 8:
                raise SampleError(key, LABEL_I64, f"{len(label_i64)} bytes, expected 8", "bad_shape")
            label = int(np.frombuffer(bytes(label_i64), dtype=LABEL_DTYPE)[0])
            _check_label(key, label, spec, LABEL_I64)
        if label_cls is not None:
            try:
                cls_label = int(bytes(label_cls).decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as e:
                raise SampleError(key, COND_CLS, f"not an ASCII integer: {bytes(label_cls)[:20]!r}", "bad_value") from e
            _check_label(key, cls_label, spec, COND_CLS)
            if label is not None and cls_label != label:
                raise SampleError(key, COND_CLS, f"{cls_label} disagrees with {LABEL_I64} {label}", "bad_value")
            label = cls_label
        sample.label = label
    else:
        T, Dt = spec.text_shape
        text_bytes, mask_bytes = _component(raw, key, TEXT), _component(raw, key, TEXT_MASK)
        if len(text_bytes) != 2 * T * Dt:
            raise SampleError(key, TEXT, f"{len(text_bytes)} bytes, expected {2 * T * Dt} for ({T}, {Dt})", "bad_shape")
        if len(mask_bytes) != T:
            raise SampleError(key, TEXT_MASK, f"{len(mask_bytes)} bytes, expected {T}", "bad_shape")
        text = np.frombuffer(text_bytes, dtype=TEXT_DTYPE).astype(np.float32).reshape(T, Dt)
        if not np.isfinite(text).all():
            raise SampleError(key, TEXT, "non-finite values", "bad_value")
        mask = np.frombuffer(mask_bytes, dtype=np.uint8)
        if not np.isin(mask, (0, 1)).all():
            raise SampleError(key, TEXT_MASK, "values must be 0 or 1", "bad_value")
        sample.text, sample.text_mask = text, mask.astype(bool)
    return sample
