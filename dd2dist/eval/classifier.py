"""The digits classifier: held-out accuracy, class consistency of generated digits, and the FID feature space.

A small CNN trained on the fixed digits train split (:mod:`dd2dist.data.digits`) in seconds on a CPU. Its
penultimate layer is the feature space of FID / precision / recall for the digits (InceptionV3 features of
16x16 digits would mostly measure upsampling artefacts), and its logits feed the Inception Score.

Trained once and cached to a file keyed by the training recipe and the split, so every evaluation of every
run measures in the same space.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dd2dist.data.digits import IMAGE_SIZE, NUM_CLASSES, SPLIT_SEED, digits_split

CACHE_ENV = "DD2DIST_CACHE_DIR"


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained (part of its cache key)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    feature_dim: int = 64
    seed: int = 0
    shift_pixels: int = 1  # random translation augmentation (pixels at 16x16)


class DigitsClassifier(nn.Module):
    """conv(16) -> conv(32) -> pool -> conv(32) -> pool -> flatten -> fc(feature_dim) -> fc(10).

    Input: images (B, C, H, W) either uint8 in [0, 255] or float in [-1, 1]; channels are averaged to grey and
    the image is resized to 16x16 if needed, so RGB digits from any tokenizer are accepted.
    """

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.fc = nn.Linear(feature_dim, NUM_CLASSES)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [-1, 1] images (B, C, H, W) -> grey float (B, 1, 16, 16) in [-1, 1]."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float().clamp(-1, 1)
        x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(penultimate features (B, feature_dim), logits (B, 10)), fp32."""
        feats = self.body(self.prepare(images).to(self.fc.weight.dtype))
        return feats, self.fc(feats)

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[1]

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Predicted class ids (B,)."""
        out = [self(images[i : i + batch_size]).argmax(-1) for i in range(0, images.shape[0], batch_size)]
        return torch.cat(out)


def _random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    if max_shift <= 0:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    H, W = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[..., dy : dy + H, dx : dx + W]


def train_classifier(recipe: ClassifierRecipe = ClassifierRecipe()) -> tuple[DigitsClassifier, dict]:
    """Train on the digits train split; returns (the classifier in eval mode, {"heldout_accuracy", ...})."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    train, heldout = digits_split("train"), digits_split("heldout")
    model = DigitsClassifier(recipe.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = (len(train) + recipe.batch_size - 1) // recipe.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            x = _random_shift(train.images[idx], recipe.shift_pixels, gen)
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    acc = float((model.predict(heldout.images) == heldout.labels).float().mean())
    info = {
        "heldout_accuracy": acc,
        "train_accuracy": float((model.predict(train.images) == train.labels).float().mean()),
        "train_seconds": time.perf_counter() - t0,
        "recipe": asdict(recipe),
        "split_seed": SPLIT_SEED,
    }
    return model, info


def recipe_key(recipe: ClassifierRecipe) -> str:
    """Cache key of a recipe and the split it trains on."""
    text = json.dumps({"recipe": asdict(recipe), "split_seed": SPLIT_SEED, "version": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    """``$DD2DIST_CACHE_DIR``, else ``~/.cache/dd2dist``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dd2dist")


def classifier_path(recipe: ClassifierRecipe = ClassifierRecipe(), cache_dir: str | None = None) -> str:
    """Where the classifier of ``recipe`` is (or will be) cached."""
    return os.path.join(cache_dir or default_cache_dir(), f"digits_classifier-{recipe_key(recipe)}.pt")


def save_classifier(model: DigitsClassifier, info: dict, path: str) -> str:
    """Write ``{"state_dict", "feature_dim", "info"}`` atomically; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"state_dict": model.state_dict(), "feature_dim": model.feature_dim, "info": info}, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(path: str) -> tuple[DigitsClassifier, dict]:
    """(classifier in eval mode, its training info) from a file written by :func:`save_classifier`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier file not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "feature_dim", "info"):
        if key not in blob:
            raise ValueError(f"{path}: not a digits classifier file (missing key {key!r})")
    model = DigitsClassifier(int(blob["feature_dim"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False), blob["info"]


def cached_classifier(
    recipe: ClassifierRecipe = ClassifierRecipe(), cache_dir: str | None = None
) -> tuple[DigitsClassifier, dict, str]:
    """(classifier, info, path): loaded from the cache, or trained and cached on first use."""
    path = classifier_path(recipe, cache_dir)
    if os.path.isfile(path):
        model, info = load_classifier(path)
        return model, info, path
    model, info = train_classifier(recipe)
    save_classifier(model, info, path)
    return model, info, path
