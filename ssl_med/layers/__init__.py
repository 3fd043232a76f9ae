"""Reusable layers of the backbones and decoders (patch/position embedding, attention; Vision-LSTM's in :mod:`ssl_med.layers.vil`)."""

from ssl_med.layers.attention import Attention, attention, pack_padded, unpack_padded
from ssl_med.layers.patch_embed import PatchEmbed, patchify, unpatchify
from ssl_med.layers.pos_embed import resample_pos_embed, sincos_pos_embed
from ssl_med.layers.transformer import Block

__all__ = [
    "Attention",
    "Block",
    "PatchEmbed",
    "attention",
    "pack_padded",
    "patchify",
    "resample_pos_embed",
    "sincos_pos_embed",
    "unpack_padded",
    "unpatchify",
]
