"""Bit packing of integer codes and masks (numpy, little work, exact round trip).

``pack_codes``: ``bits``-bit codes, densely, most significant bit first, no padding between
codes; the last byte is zero-padded. int8: one code per byte; int4: two codes per byte (first
code in the high nibble); int3: 8 codes in 3 bytes. ``pack_mask``: ``np.packbits`` (big bit
order) of a flat boolean mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def pack_codes(codes: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of ``ceil(n * bits / 8)`` bytes holding the ``n`` codes."""
    c = np.ascontiguousarray(np.asarray(codes, dtype=np.uint8).reshape(-1))
    if c.size and int(c.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(c.max())})")
    if bits == 8:
        out = c.copy()
    elif bits == 4:
        if c.size % 2:
            c = np.concatenate([c, np.zeros(1, np.uint8)])
        out = (c[0::2] << 4) | c[1::2]
    else:
        out = np.packbits(np.unpackbits(c[:, None], axis=1)[:, 8 - bits :].reshape(-1))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8))


def unpack_codes(packed: torch.Tensor | np.ndarray, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``n`` uint8 codes. Raises ValueError on a wrong length."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if p.size != packed_nbytes(n, bits):
        raise ValueError(f"{p.size} packed bytes cannot hold exactly {n} {bits}-bit codes")
    if bits == 8:
        out = p.copy()
    elif bits == 4:
        out = np.stack([p >> 4, p & 15], axis=1).reshape(-1)[:n]
    else:
        b = np.unpackbits(p)[: n * bits].reshape(n, bits)
        out = np.packbits(np.concatenate([np.zeros((n, 8 - bits), np.uint8), b], 1), axis=1)
        out = out.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.uint8))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(bool)))


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if p.size != math.ceil(n / 8):
        raise ValueError(f"{p.size} mask bytes cannot hold exactly {n} bits")
    return torch.from_numpy(np.unpackbits(p)[:n].astype(bool))
