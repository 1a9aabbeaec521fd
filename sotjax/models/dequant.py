"""Dequantisation of GGML block formats to float32 (numpy, vectorised over blocks).

Written from ggml's reference C routines (``dequantize_row_*`` in ``ggml-quants.c``); the tests
check every format against the ``gguf`` package's own dequantiser. A row of ``n`` values is stored
as ``n / block_size`` blocks of ``type_size`` bytes; ``fp16`` fields are little-endian IEEE halves.

Block formats (``d``, ``m`` are per-block fp16 scale/minimum, ``q`` the packed integers):

- ``Q8_0`` (32 values, 34 B): ``x = d · q``, q int8.
- ``Q4_0`` (32, 18 B): ``x = d · (q − 8)``, q 4-bit; low nibbles are values 0..15, high 16..31.
- ``Q4_1`` (32, 20 B): ``x = d · q + m``.
- ``Q5_0`` (32, 22 B): ``x = d · (q − 16)``, q = nibble | (bit j of ``qh``) << 4.
- ``Q5_1`` (32, 24 B): ``x = d · q + m`` with the 5-bit q of Q5_0.
- ``Q4_K`` (256, 144 B): 8 sub-blocks of 32 with 6-bit scales ``s_j``/mins ``m_j`` packed in 12 bytes;
  ``x = d · s_j · q − dmin · m_j``.
- ``Q5_K`` (256, 176 B): as Q4_K with a fifth bit from ``qh``.
- ``Q6_K`` (256, 210 B): 16 sub-blocks of 16 with int8 scales; ``x = d · s_j · (q − 32)``, q 6-bit
  (4 low bits in ``ql``, 2 high bits in ``qh``).
"""

from __future__ import annotations

import numpy as np

QK = 32  # values per block of the legacy formats
QK_K = 256  # values per super-block of the k-quants

# name -> (values per block, bytes per block)
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (QK, 2 + QK),
    "Q4_0": (QK, 2 + QK // 2),
    "Q4_1": (QK, 4 + QK // 2),
    "Q5_0": (QK, 2 + 4 + QK // 2),
    "Q5_1": (QK, 4 + 4 + QK // 2),
    "Q4_K": (QK_K, 4 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 4 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}
SUPPORTED_TYPES = tuple(BLOCK_LAYOUT)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at byte ``start`` of each block, as (n_blocks, 1) float32."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) values: the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.float32) - 8.0)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _fifth_bits(qh_bytes: np.ndarray) -> np.ndarray:
    """Bit j (j = 0..31) of the little-endian uint32 ``qh``, shifted to 16, as (n, 32) uint8."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4")  # (n, 1)
    bits = (qh >> np.arange(32, dtype=np.uint32)[None, :]) & 1
    return (bits << 4).astype(np.uint8)


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])
    return _f16(b, 0) * (q.astype(np.float32) - 16.0)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit scale/min table of Q4_K/Q5_K into (n, 8) scales and (n, 8) mins.

    ``get_scale_min_k4(j)``: for j < 4, ``s = q[j] & 63``, ``m = q[j+4] & 63``; for j ≥ 4,
    ``s = (q[j+4] & 0xF) | ((q[j−4] >> 6) << 4)``, ``m = (q[j+4] >> 4) | ((q[j] >> 6) << 4)``.
    """
    q = scales.astype(np.uint8)
    s = np.empty((q.shape[0], 8), dtype=np.uint8)
    m = np.empty((q.shape[0], 8), dtype=np.uint8)
    s[:, :4] = q[:, 0:4] & 63
    m[:, :4] = q[:, 4:8] & 63
    s[:, 4:] = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return s.astype(np.float32), m.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): sub-block 2i = low nibbles of bytes 32i.., 2i+1 = high nibbles."""
    qs = qs.reshape(qs.shape[0], 4, 32)
    return np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(qs.shape[0], 8, 32)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:]).astype(np.float32)
    x = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return x.reshape(b.shape[0], QK_K)


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]  # (n, 32): bit j of qh[l] is the fifth bit of value l of sub-block j
    high = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4  # (n, 8, 32)
    q = (_k_low_nibbles(b[:, 48:]) | high).astype(np.float32)
    x = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return x.reshape(b.shape[0], QK_K)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64)  # two halves of 128 values
    qh = b[:, 128:192].reshape(n, 2, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 16)
    d = _f16(b, 208)
    # within a half: values l, l+32, l+64, l+96 (l < 32) take
    #   ql[l] & 0xF, ql[l+32] & 0xF, ql[l] >> 4, ql[l+32] >> 4 and qh[l] bits (0,1), (2,3), (4,5), (6,7)
    low = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    high = (qh[:, :, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.float32) - 32.0  # (n, 2, 4, 32)
    # scale index: 16 values per scale -> value v of the half uses scale 8*half + v // 16
    q = q.reshape(n, 16, 16)
    return ((d * scales)[:, :, None] * q).reshape(n, QK_K)


_DEQUANT = {
    "Q8_0": _dequant_q8_0,
    "Q4_0": _dequant_q4_0,
    "Q4_1": _dequant_q4_1,
    "Q5_0": _dequant_q5_0,
    "Q5_1": _dequant_q5_1,
    "Q4_K": _dequant_q4_k,
    "Q5_K": _dequant_q5_k,
    "Q6_K": _dequant_q6_k,
}


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the bytes (or typed array) of one GGUF tensor into float32 of ``shape`` (row-major).

    ``shape`` is numpy order (the reverse of GGUF's ``ne``): the last axis is the contiguous one.
    Raises ``ValueError`` for a type not in :data:`SUPPORTED_TYPES` or a size mismatch.
    """
    if type_name not in BLOCK_LAYOUT:
        raise ValueError(f"unsupported GGML type {type_name} (supported: {', '.join(SUPPORTED_TYPES)})")
    n_values = int(np.prod(shape))
    if type_name == "F32":
        return np.asarray(raw).view("<f4").reshape(shape).astype(np.float32)
    if type_name == "F16":
        return np.asarray(raw).view("<f2").reshape(shape).astype(np.float32)
    if type_name == "BF16":
        bits = np.asarray(raw).view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    block_values, block_bytes = BLOCK_LAYOUT[type_name]
    data = np.asarray(raw).view(np.uint8).reshape(-1)
    if n_values % block_values or data.size != n_values // block_values * block_bytes:
        raise ValueError(f"{type_name}: {data.size} bytes do not hold a tensor of shape {shape}")
    blocks = data.reshape(-1, block_bytes)
    return _DEQUANT[type_name](blocks).reshape(shape).astype(np.float32, copy=False)
