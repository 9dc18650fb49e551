"""Captions of the digits that say only what is true of each image: its class and two properties measured from its
pixels, each binned into words.

* thickness: the ink mass (mean ink per pixel) -> "thin" / "thick";
* slant: the shear moment of the ink (how far the strokes' horizontal position moves per row, top vs bottom)
  -> "leaning left" / "upright" / "leaning right".

The cut points are quantiles of the TRAIN split computed per class: a "thick one" and a "thick eight" hold very
different ink masses, and per-class quantiles keep every (class, word) cell equally populated, so a teacher
cannot satisfy a property word by drawing its class's typical image. They are stored (:class:`PropertyBins`),
so generated images are scored against exactly the thresholds the captions were made with.

Each caption is rendered through one of several phrasings (word orders, filler words, digit-name synonyms). A
fixed subset of phrasings is never used for training captions: prompts in those phrasings measure whether a
teacher follows the content words or memorised the sentences.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

from dd2dist.data.digits import NUM_CLASSES, digits_split

PROPERTY_WORDS: dict[str, tuple[str, ...]] = {
    "thickness": ("thin", "thick"),
    "slant": ("leaning left", "upright", "leaning right"),
}
PROPERTIES: tuple[str, ...] = tuple(PROPERTY_WORDS)

_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_names(cls: int) -> tuple[str, ...]:
    """Synonyms of a class in captions: "seven", "7", "number seven", "digit 7"."""
    return (_NAMES[cls], str(cls), f"number {_NAMES[cls]}", f"digit {cls}")


# {digit} = a digit name, {thickness} / {slant} = the property words. Indices are the template ids in records.
TEMPLATES: tuple[str, ...] = (
    "a {thickness} {digit}, {slant}",
    "{digit}, {thickness} and {slant}",
    "a handwritten {digit} that is {thickness} and {slant}",
    "{slant} {thickness} {digit}",
    "an image of a {thickness} {digit} {slant}",
    "{thickness} strokes, {slant}, {digit}",
    "the {digit} is written {thickness} and {slant}",
    "{digit} {slant} with {thickness} strokes",
    "{thickness} {digit} {slant}",
    "a scan of a {digit}; the strokes are {thickness}; it is {slant}",
    "{slant}, a {digit} in {thickness} pen",
    "written by hand: {digit}, {thickness}, {slant}",
    "{digit} written {slant} using {thickness} lines",
    "here is a {thickness} {digit} that looks {slant}",
    "sketch of {digit}, {slant} and {thickness}",
    "{thickness} and {slant} {digit} on a black background",
    # held out: word orders and filler words no training caption has
    "a photo showing {digit} drawn {slant} in {thickness} ink",
    "{slant} and {thickness}: {digit}",
    "picture of {digit}, quite {thickness}, {slant}",
)
HELDOUT_TEMPLATES: frozenset[int] = frozenset({16, 17, 18})  # never rendered into training captions
SEEN_TEMPLATES: tuple[int, ...] = tuple(i for i in range(len(TEMPLATES)) if i not in HELDOUT_TEMPLATES)


def _grey_ink(images_uint8: Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, H, W) float64 ink in [0, 1] (the digits are bright strokes on black)."""
    x = images_uint8.numpy() if isinstance(images_uint8, Tensor) else np.asarray(images_uint8)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    return x.astype(np.float64).mean(axis=1) / 255.0


def measure_properties(images_uint8: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """The raw property values of each image: ``{"thickness": (N,), "slant": (N,)}`` float64.

    thickness = mean ink per pixel. slant = minus the least-squares slope of column on row of the ink (pixels per
    row, image rows grow downwards): > 0 when the top of the strokes sits right of their bottom (leaning right).
    An image without ink has slant 0.
    """
    ink = _grey_ink(images_uint8)
    n, h, w = ink.shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    mass = ink.sum(axis=(1, 2))
    safe = np.maximum(mass, 1e-12)
    cy = (ink * rows).sum(axis=(1, 2)) / safe
    cx = (ink * cols).sum(axis=(1, 2)) / safe
    dy = rows[None] - cy[:, None, None]
    dx = cols[None] - cx[:, None, None]
    var_y = (ink * dy * dy).sum(axis=(1, 2))
    cov = (ink * dx * dy).sum(axis=(1, 2))
    slant = np.where(var_y > 1e-9, -cov / np.maximum(var_y, 1e-9), 0.0)
    return {"thickness": mass / (h * w), "slant": slant}


@dataclass(frozen=True)
class PropertyBins:
    """Per-class cut points of every property: ``cuts[property][class]`` = ascending thresholds, one fewer than
    the property's words. A value v falls in bin ``#cuts <= v``."""

    cuts: dict[str, tuple[tuple[float, ...], ...]]

    def __post_init__(self) -> None:
        for prop, per_class in self.cuts.items():
            if prop not in PROPERTY_WORDS:
                raise ValueError(f"PropertyBins: unknown property {prop!r} (known: {', '.join(PROPERTIES)})")
            want = len(PROPERTY_WORDS[prop]) - 1
            if len(per_class) != NUM_CLASSES or any(len(c) != want for c in per_class):
                raise ValueError(f"PropertyBins.cuts[{prop!r}] must hold {NUM_CLASSES} classes x {want} thresholds")

    def bin_of(self, prop: str, values: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Bin index (N,) int64 of each value under its class's thresholds."""
        values, classes = np.asarray(values, dtype=np.float64), np.asarray(classes, dtype=np.int64)
        cuts = np.asarray(self.cuts[prop], dtype=np.float64)[classes]  # (N, bins - 1)
        return (cuts <= values[:, None]).sum(axis=1).astype(np.int64)

    def words_of(self, images_uint8: Tensor | np.ndarray, classes) -> dict[str, list[str]]:
        """The property words that are true of each image, measured against the thresholds of ``classes``."""
        values = measure_properties(images_uint8)
        classes = np.asarray(classes.numpy() if isinstance(classes, Tensor) else classes, dtype=np.int64)
        return {p: [PROPERTY_WORDS[p][b] for b in self.bin_of(p, values[p], classes)] for p in self.cuts}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PropertyBins:
        data = json.loads(text)
        return cls({p: tuple(tuple(float(v) for v in c) for c in per_class) for p, per_class in data["cuts"].items()})


def fit_property_bins(images_uint8: Tensor | np.ndarray, labels) -> PropertyBins:
    """Quantile thresholds per class and property: k bins get the (1/k, ..., (k-1)/k) quantiles of the class."""
    values = measure_properties(images_uint8)
    labels = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    cuts: dict[str, tuple[tuple[float, ...], ...]] = {}
    for prop, words in PROPERTY_WORDS.items():
        qs = np.arange(1, len(words)) / len(words)
        per_class = []
        for c in range(NUM_CLASSES):
            v = values[prop][labels == c]
            if v.size == 0:
                raise ValueError(f"fit_property_bins: no image of class {c} to fit thresholds on")
            per_class.append(tuple(float(q) for q in np.quantile(v, qs)))
        cuts[prop] = tuple(per_class)
    return PropertyBins(cuts)


@functools.lru_cache(maxsize=1)
def train_bins() -> PropertyBins:
    """The thresholds of every digits caption: fitted on the train split."""
    train = digits_split("train")
    return fit_property_bins(train.uint8(), train.labels)


def render_caption(template: int, cls: int, words: dict[str, str], name: int = 0) -> str:
    """Caption text of one template, class, property words and digit-name synonym (index into digit_names)."""
    names = digit_names(cls)
    return TEMPLATES[template].format(digit=names[name % len(names)], **words)


def _templates(kind: str) -> tuple[int, ...]:
    if kind == "seen":
        return SEEN_TEMPLATES
    if kind == "heldout":
        return tuple(sorted(HELDOUT_TEMPLATES))
    raise ValueError(f"template kind must be 'seen' or 'heldout', got {kind!r}")


def _record(rng: np.random.Generator, kind: str, cls: int, words: dict[str, str]) -> dict:
    template = int(rng.choice(_templates(kind)))
    name = int(rng.integers(len(digit_names(cls))))
    return {"caption": render_caption(template, cls, words, name), "class": cls, "words": dict(words),
            "template": template, "name": name, "heldout": template in HELDOUT_TEMPLATES}


def caption_records(split: str = "train", seed: int = 0, per_image: int = 4, kind: str = "seen") -> list[dict]:
    """``per_image`` true captions of every image of a digits split, image by image (split order).

    Each record: ``key`` ("<split>-<sklearn row>"), ``index`` (row in the split), ``caption``, ``class``,
    ``words`` ({property: word}), ``template`` (id), ``name`` (which of :func:`digit_names`), ``heldout``
    (template held out). The train split only ever
    gets seen templates; ``kind="heldout"`` (held-out phrasings) is for the held-out split.
    """
    if per_image <= 0:
        raise ValueError(f"caption_records: per_image must be > 0, got {per_image}")
    if split == "train" and kind != "seen":
        raise ValueError("caption_records: the train split is captioned with seen templates only (kind='seen')")
    data = digits_split(split)
    labels = data.labels.numpy()
    words = train_bins().words_of(data.uint8(), labels)
    rng = np.random.default_rng([seed, per_image, 0 if split == "train" else 1])
    out = []
    for i, (row, cls) in enumerate(zip(data.indices, labels)):
        w = {p: words[p][i] for p in PROPERTIES}
        for _ in range(per_image):
            out.append({"key": f"{split}-{int(row):04d}", "index": i, **_record(rng, kind, int(cls), w)})
    return out


def prompt_set(kind: str = "seen", per_combo: int = 1, seed: int = 0) -> list[dict]:
    """Evaluation prompts: ``per_combo`` captions of every class x thickness x slant combination (class-major), in
    seen or held-out phrasings. Records as in :func:`caption_records`, without ``key`` / ``index``."""
    if per_combo <= 0:
        raise ValueError(f"prompt_set: per_combo must be > 0, got {per_combo}")
    rng = np.random.default_rng([seed, per_combo, 2 if kind == "seen" else 3])
    out = []
    for cls in range(NUM_CLASSES):
        for thick in PROPERTY_WORDS["thickness"]:
            for slant in PROPERTY_WORDS["slant"]:
                for _ in range(per_combo):
                    out.append(_record(rng, kind, cls, {"thickness": thick, "slant": slant}))
    return out
