"""DALL-E d-VAE image tokenizer that produces the masked-image-modelling targets.

The official weights are ``encoder.pkl`` (and ``decoder.pkl``) in one folder: whole pickled modules
of the ``dall_e`` package. They are loaded with ``torch.load(weights_only=True)`` and an allow-list of
exactly the classes such a file needs, so a tampered file cannot run code. Training needs only the
encoder; the decoder is loaded on request. A randomly initialised encoder of any width serves tests
and the built-in demo.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from dall_e.decoder import Decoder, DecoderBlock
from dall_e.encoder import Encoder, EncoderBlock
from dall_e.utils import Conv2d
from dall_e.utils import map_pixels as dalle_map_pixels

DALLE_VOCAB_SIZE = 8192

# Everything an official (or locally pickled) encoder.pkl / decoder.pkl references besides tensors.
DALLE_SAFE_GLOBALS = [
    Encoder, EncoderBlock, Decoder, DecoderBlock, Conv2d,
    nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Upsample,
]


def _load_pickled_module(path: str, device: torch.device | str) -> nn.Module:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"d-VAE weights not found: {path}")
    try:
        with torch.serialization.safe_globals(DALLE_SAFE_GLOBALS):
            module = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"could not load the d-VAE module from {path}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise TypeError(f"{path} holds a {type(module).__name__}, expected a pickled dall_e module")
    return module


class DalleVAE(nn.Module):
    """Wrapper exposing ``get_codebook_indices`` over a ``dall_e`` encoder."""

    def __init__(self, encoder: Encoder, decoder: Decoder | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.encoder.requires_grad_(False)
        if self.decoder is not None:
            self.decoder.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return int(self.encoder.vocab_size)

    @classmethod
    def load(cls, model_dir: str, device: torch.device | str = "cpu", load_decoder: bool = False) -> DalleVAE:
        """Load ``model_dir/encoder.pkl`` (and ``decoder.pkl`` when asked) without executing pickled code."""
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"image_tokenizer_path {model_dir!r} is not a folder holding encoder.pkl")
        encoder = _load_pickled_module(os.path.join(model_dir, "encoder.pkl"), device)
        decoder = _load_pickled_module(os.path.join(model_dir, "decoder.pkl"), device) if load_decoder else None
        return cls(encoder, decoder)

    @classmethod
    def random(cls, n_hid: int = 64, n_blk_per_group: int = 1, vocab_size: int = DALLE_VOCAB_SIZE,
               seed: int = 0) -> DalleVAE:
        """A randomly initialised encoder (deterministic from ``seed``) for tests and the demo."""
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            encoder = Encoder(n_hid=n_hid, n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
                              use_mixed_precision=False)
        finally:
            torch.random.set_rng_state(state)
        return cls(encoder)

    def save(self, model_dir: str) -> None:
        """Write ``encoder.pkl`` (and ``decoder.pkl``) in the official whole-module format."""
        os.makedirs(model_dir, exist_ok=True)
        torch.save(self.encoder, os.path.join(model_dir, "encoder.pkl"))
        if self.decoder is not None:
            torch.save(self.decoder, os.path.join(model_dir, "decoder.pkl"))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images in the ``map_pixels`` range -> ``(B, H/8, W/8)`` code indices."""
        dtype = encoder_dtype(images.device)
        images = images.float()
        if dtype != torch.float32:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = self.encoder(images)
        return torch.argmax(logits, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_codebook_indices(images)


def encoder_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on channels-last images on CUDA; float32 elsewhere, so CPU codes stay the original's."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Scale ``[0, 1]`` pixels into the d-VAE's input range (``x * 0.8 + 0.1``)."""
    return dalle_map_pixels(x)
