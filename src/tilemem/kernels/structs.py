"""ctypes mirrors of the structs in `csrc/tilemem.h`. Each names its C struct (`c_name`); at load, the
library's `tm_struct_size(c_name)` must equal the mirror's `ctypes.sizeof` (see `build.check_abi`)."""

from __future__ import annotations

import ctypes

_vp, _i64 = ctypes.c_void_p, ctypes.c_int64


class X12(ctypes.Structure):
    """A bf16 matrix in 12 bits per weight, losslessly (mirrors `tm_x12`)."""

    c_name = "tm_x12"
    _fields_ = [*((name, _vp) for name in ("lo", "hc", "tab", "xrow", "xval")), ("N", _i64), ("K", _i64)]


class FfnTask(ctypes.Structure):
    """One gated-FFN task (mirrors `tm_ffn_task`)."""

    c_name = "tm_ffn_task"
    _fields_ = [
        ("gate", _vp),
        ("up", _vp),
        ("down", _vp),
        ("n", _i64),
        ("ld_gu", _i64),
        ("ld_down", _i64),
        ("down_t", ctypes.c_int32),
        ("ntok", ctypes.c_int32),
        ("tok", _vp),
        ("scale", _vp),
        ("cgate", _vp),
        ("cup", _vp),
        ("cdown", _vp),
    ]


class AttnLayer(ctypes.Structure):
    """One attention layer's weights and options for decode (mirrors `tm_attn_layer`)."""

    c_name = "tm_attn_layer"
    _fields_ = [
        *((name, _vp) for name in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm")),
        *((name, ctypes.c_int32) for name in ("qk_norm", "H", "Hkv", "hd")),
        *((name, ctypes.c_float) for name in ("eps", "scale", "clip")),
        ("fp32_rotate", ctypes.c_int32),
        *((name, _vp) for name in ("cq", "ck", "cv", "co")),
    ]


class DecodeLayer(ctypes.Structure):
    """One MoE decoder layer's weights and routing options for a fused decode step (mirrors
    `tm_decode_layer`): softmax top-k routing and routed experts in checkpoint layout."""

    c_name = "tm_decode_layer"
    _fields_ = [
        ("attn", AttnLayer),
        ("ln1", _vp),
        ("ln2", _vp),
        ("eps", ctypes.c_float),
        *((name, _vp) for name in ("router", "gate", "up", "down")),
        *((name, ctypes.c_int32) for name in ("E", "K", "I", "act", "norm_topk", "weights_bf16")),
        ("routed_scale", ctypes.c_float),
        *((name, _vp) for name in ("cgate", "cup", "cdown")),
    ]


STRUCTS: tuple[type[ctypes.Structure], ...] = (X12, FfnTask, AttnLayer, DecodeLayer)
"""Every struct the library and Python share, checked at load."""
