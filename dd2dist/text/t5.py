"""The T5 encoder of LlamaGen's text-to-image models (FLAN-T5-XL: 2048 wide, 120 slots), from a local directory.

Nothing is downloaded: ``from_pretrained`` runs with ``local_files_only=True``, and the directory is checked first so
that a missing piece is named (the directory, ``config.json``, the weights, the tokenizer files) instead of surfacing
as a hub lookup error deep inside transformers. Features are the encoder's last hidden state of the caption's valid
tokens (the tokenizer's end-of-sequence token included, as LlamaGen feeds it), truncated to ``slots`` tokens and
left-padded like every other encoder of :mod:`dd2dist.text.encoders`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from dd2dist.text.encoders import TextEncoder, left_pad

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# A fast tokenizer is one tokenizer.json; a slow T5 tokenizer is its SentencePiece model.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def check_t5_directory(directory: str | Path) -> Path:
    """Return ``directory`` as a Path if it holds a T5 encoder and tokenizer, else ValueError naming what is missing."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"T5 text encoder: directory {str(path)!r} does not exist")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or spiece.model)")
    if missing:
        raise ValueError(f"T5 text encoder: {str(path)!r} lacks {', '.join(missing)}")
    return path


def t5_identity(directory: str | Path, slots: int) -> tuple[str, int]:
    """(name, width) of the T5 encoder in ``directory`` without loading it: caption shards record the name, and a
    driver checks it before any worker loads a 3-billion-parameter model."""
    path = check_t5_directory(directory)
    raw = (path / "config.json").read_bytes()
    try:
        width = int(json.loads(raw)["d_model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"T5 text encoder: {str(path / 'config.json')!r} has no integer d_model: {e!r}") from None
    digest = hashlib.sha256(raw).hexdigest()[:10]
    return f"t5:{digest}-{path.resolve().name},slots={int(slots)}", width


class T5TextEncoder(TextEncoder):
    """A ``transformers.T5EncoderModel`` + its tokenizer from ``directory``; see the module docstring."""

    def __init__(self, directory: str | Path, slots: int = 120, device: str = "cpu"):
        if slots <= 0:
            raise ValueError(f"T5 text encoder: slots must be > 0, got {slots}")
        self.name, self.width = t5_identity(directory, slots)
        self.slots, self.device = int(slots), device
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(directory), local_files_only=True).to(device).eval()
        if int(self.model.config.d_model) != self.width:
            raise ValueError(f"T5 text encoder: {directory}: model width {self.model.config.d_model} != {self.width}")

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if not captions:
            return left_pad([], self.slots, self.width)
        batch = self.tokenizer(list(captions), max_length=self.slots, truncation=True, padding=True,
                               return_tensors="pt")
        ids, valid = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=valid).last_hidden_state.float().cpu()
        valid = valid.bool().cpu()
        return left_pad([hidden[b][valid[b]] for b in range(len(captions))], self.slots, self.width)
