"""Quantize float rows into llama.cpp's block types, for synthetic GGUF files.

The 32-weight types go through the `gguf` package's quantizers (llama.cpp's reference rounding). It has none for
the K-quants, so Q4_K, Q5_K and Q6_K are ours: a plain min/max (or absmax) fit per sub-block, the sub-block
scales quantized against the super-block's fp16 `d` / `dmin`, then the weights rounded against those scales.
It is not llama.cpp's error-minimising search (`make_qkx2_quants`), only a valid block of the same layout
whose decoding (`layers.ggml.dequantize`, llama.cpp's) is close to the input: every test and benchmark runs
the blocks as they are, whoever wrote them.

Shape legend: B super-blocks of 256 weights.
"""

from __future__ import annotations

import numpy as np
import torch

from tilemem.layers.ggml import QK_K, QUANT_TYPES


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[B] fp32 -> [B, 2] the fp16 bytes (little-endian)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 and back (what the decoder will read)."""
    return x.to(torch.float16).float()


def _pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins [B, 8] -> the 12 bytes `get_scale_min_k4` reads [B, 12]."""
    out = torch.empty(sc.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out.to(torch.uint8)


def _quant_k_min(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K fit of x [B, 256]: (header bytes [B, 16] = d, dmin, 12 scale bytes; q [B, 256] in 0..levels)."""
    sub = x.view(-1, 8, 32)  # [B, 8, 32]
    lo = sub.amin(-1).clamp(max=0)  # [B, 8]
    scale = (sub.amax(-1) - lo) / levels  # [B, 8]
    d = _fp16(scale.amax(-1) / 63)  # [B]
    dmin = _fp16((-lo).amax(-1) / 63)
    sc = torch.where(d[:, None] > 0, (scale / d[:, None]).round(), torch.zeros_like(scale)).clamp(0, 63).int()
    mn = torch.where(dmin[:, None] > 0, (-lo / dmin[:, None]).round(), torch.zeros_like(lo)).clamp(0, 63).int()
    step = (d[:, None] * sc.float())[..., None]  # [B, 8, 1]
    low = (dmin[:, None] * mn.float())[..., None]
    q = torch.where(step > 0, ((sub + low) / step).round(), torch.zeros_like(sub)).clamp(0, levels).int()
    head = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales_k4(sc, mn)], 1)  # [B, 16]
    return head, q.view(-1, QK_K), d


def _nibble_pairs(q: torch.Tensor) -> torch.Tensor:
    """q [B, 256] (values < 16 used) -> 128 bytes: per 64 weights, byte l = q[l] | q[l + 32] << 4."""
    c = q.view(-1, 4, 2, 32)  # [B, chunk, half, 32]
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128).to(torch.uint8)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    head, q, _ = _quant_k_min(x, 15)
    return torch.cat([head, _nibble_pairs(q)], 1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    head, q, _ = _quant_k_min(x, 31)
    high = (q >> 4).view(-1, 8, 32)  # [B, sub-block j, l]: bit j of qh[l]
    qh = sum(high[:, j] << j for j in range(8)).to(torch.uint8)  # [B, 32]
    return torch.cat([head, qh, _nibble_pairs(q)], 1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    sub = x.view(-1, 16, 16)  # [B, 16, 16]
    scale = sub.abs().amax(-1) / 31  # [B, 16]
    d = _fp16(scale.amax(-1) / 127)  # [B]
    sc = torch.where(d[:, None] > 0, (scale / d[:, None]).round(), torch.zeros_like(scale)).clamp(-128, 127)
    step = (d[:, None] * sc)[..., None]  # [B, 16, 1]
    q = torch.where(step != 0, (sub / step).round(), torch.zeros_like(sub)).clamp(-32, 31).int() + 32
    q = q.view(-1, 2, 4, 32)  # [B, half, quarter, l]: weights 128 h + 32 k + l
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2)
    qh = sum((q[:, :, k] >> 4) << (2 * k) for k in range(4))  # [B, 2, 32]
    scales = sc.to(torch.int8).view(torch.uint8)  # [B, 16]
    return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), scales, _fp16_bytes(d)], 1).to(torch.uint8)


K_QUANTIZERS = {"q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def quantize(qtype: str, x: torch.Tensor) -> torch.Tensor:
    """Rows x [..., C] (C a multiple of the type's block) -> their blocks uint8 [..., row_bytes]."""
    q = QUANT_TYPES[qtype]
    cols = x.shape[-1]
    if cols % q.weights:
        raise ValueError(f"{qtype} needs rows of a multiple of {q.weights} weights, not {cols}")
    flat = x.reshape(-1, cols).float()
    if qtype in K_QUANTIZERS:
        blocks = K_QUANTIZERS[qtype](flat.reshape(-1, QK_K).contiguous())  # [B, nbytes]
    else:
        import gguf

        kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
        blocks = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(flat.numpy(), kind)))
    return blocks.reshape(*x.shape[:-1], q.row_bytes(cols))
