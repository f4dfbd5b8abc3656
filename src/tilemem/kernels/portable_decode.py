"""A decode step's run of MoE decoder layers in one native call on AVX2 (`csrc_portable/decode_layer.c`): what the
AVX512 library's `native_decode` does, for the layers that library does not take. Each layer's attention (GQA: q/k/v/o
linears around the paged decode block; DeepSeek's MLA: `csrc_portable/mla_decode.c`), its norms, its softmax top-k
router (bf16 or fp32 logits), its routed experts' fused FFN and its shared experts run in C, the linears and experts
in any format the portable library reads (bf16, FP8, GGUF blocks).

A model describes each layer once per set of weights (`linear` per projection, `layer` per decoder layer; None where
a layer runs as modules); `PortableDecode` groups consecutive layers into runs and runs one per call, handing each
layer's routed ids to the model's observers as the module path does.

Shape legend: B rows, D hidden, K experts per token, E experts, hd head width, N cache blocks, bs positions a block.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from tilemem.errors import KernelError
from tilemem.kernels import paged_decode, portable
from tilemem.kernels.native_decode import LayerRuns

log = logging.getLogger(__name__)

_vp, _i64, _int, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
FORMATS = {"bf16": 0, "fp8": 1, "ggml": 2}
"""A linear's or the experts' weight format -> the kernel's code (LIN_* in decode_layer.c)."""
QK_NORMS = paged_decode.NORMS
MAX_ROWS = 8
"""Most rows a step takes: the module path's bf16 linears switch to another summation past this (`kernels.bf16`)."""


class LinearW(ctypes.Structure):
    """One linear's weight for the kernel (mirrors `tmp_linear`): bf16, FP8 (with block scales) or GGUF blocks."""

    _fields_ = [
        ("kind", _i64), ("w", _vp), ("ldw", _i64), ("scale", _vp), ("lds", _i64), ("type", _i64), ("exact", _i64),
        ("bias", _vp), ("R", _i64), ("C", _i64),
    ]  # fmt: skip


class MLAW(ctypes.Structure):
    """Multi-head latent attention's decode weights for the kernel (mirrors `tmp_mla`)."""

    _fields_ = [
        *((name, LinearW) for name in ("q_a", "q_b", "kv_a")), ("q_a_ln", _vp), ("kv_a_ln", _vp),
        ("latent_eps", _f64), ("R", _i64), ("dn", _i64), ("dr", _i64), ("dv", _i64), ("interleave", _i64),
        ("w_kv", _vp),
    ]  # fmt: skip


class MLA(NamedTuple):
    """A layer's MLA for `layer`: q_a and q_b (`linear`s, None without a q LoRA: the q linear is then q_proj), kv_a,
    their bf16 RMSNorm weights (q_a's None without it) at epsilon `eps`, the widths (R, dn, dr, dv), whether the rope
    part rotates interleaved pairs, and the absorbed kv_b_proj bf16 [H, dn + dv, R] (contiguous)."""

    q_a: tuple[LinearW, tuple] | None
    q_b: tuple[LinearW, tuple] | None
    kv_a: tuple[LinearW, tuple]
    q_a_ln: torch.Tensor | None
    kv_a_ln: torch.Tensor
    eps: float
    widths: tuple[int, int, int, int]
    interleave: bool
    w_kv: torch.Tensor


class LayerW(ctypes.Structure):
    """One MoE decoder layer for the kernel (mirrors `tmp_decode_layer`)."""

    _fields_ = [
        *((name, LinearW) for name in ("q", "k", "v", "o", "router")),
        ("ln1", _vp), ("ln2", _vp), ("eps", _f64), ("H", _i64), ("Hkv", _i64), ("hd", _i64), ("qk_norm", _i64),
        ("qw", _vp), ("kw", _vp), ("qk_eps", _f64), ("clip_on", _i64), ("clip", _f64), ("scale", _f64), ("E", _i64),
        ("K", _i64), ("norm_topk", _i64), ("weights_bf16", _i64), ("routed_scale", _f64), ("ffn", _i64),
        ("experts", _vp), ("words", _i64), ("act", _i64), ("exact", _i64), ("shared_ffn", _i64), ("shared", _vp),
        ("shared_words", _i64), ("shared_gate_on", _i64), ("shared_gate", LinearW), ("router_fp32", _i64),
        ("mla", _i64), ("m", MLAW),
    ]  # fmt: skip


class Layer(NamedTuple):
    """A decoder layer's `LayerW` and the tensors it points into (kept alive with it)."""

    struct: LayerW
    keep: tuple


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with `tmp_decode_layers` typed, or None where it cannot run here (or its layer
    struct is not `LayerW`'s size)."""
    out = portable.load()
    if out is None:
        return None
    out.tmp_decode_layer_size.restype = _i64
    if out.tmp_decode_layer_size() != ctypes.sizeof(LayerW):
        log.warning(
            "portable decode layers unavailable: tmp_decode_layer is not LayerW's %d bytes", ctypes.sizeof(LayerW)
        )
        return None
    out.tmp_decode_layers.argtypes = [
        ctypes.POINTER(LayerW), _i64, _vp, _i64, _i64, _vp, _vp, _i64, _int, _vp, _vp, *[_i64] * 8, _vp, _i64, _vp,
        _vp, _int,
    ]  # fmt: skip
    return out


def available() -> bool:
    """Whether the one-call decode layers run here."""
    return lib() is not None


def linear(
    weight: torch.Tensor,
    fmt: str,
    cols: int,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    ggml_type: int = 0,
    exact: bool = True,
) -> tuple[LinearW, tuple] | None:
    """A linear's weight [R, C=cols] for the kernel with what it points into, or None where the kernel does not
    take it: `fmt` "bf16" (a bf16 matrix), "fp8" (float8_e4m3fn with fp32 block `scale`) or "ggml" (uint8 rows of
    `ggml_type` blocks, `exact` or llama.cpp's fast way); rows contiguous, on the CPU; `bias` bf16 [R] or None."""
    if weight.device.type != "cpu" or weight.dim() != 2 or (weight.shape[1] > 1 and weight.stride(1) != 1):
        return None
    rows = weight.shape[0]
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (rows,) or not bias.is_contiguous()):
        return None
    keep: tuple = (weight, bias)
    lin = LinearW(kind=FORMATS[fmt], w=weight.data_ptr(), ldw=weight.stride(0), R=rows, C=cols)
    lin.bias = None if bias is None else bias.data_ptr()
    if fmt == "bf16" and (weight.dtype != torch.bfloat16 or weight.shape[1] != cols):
        return None
    if fmt == "fp8":
        blocks = (-(-rows // 128), -(-cols // 128))
        if weight.dtype != torch.float8_e4m3fn or scale is None or scale.dtype != torch.float32:
            return None
        if tuple(scale.shape) != blocks or weight.shape[1] != cols:
            return None
        scale = scale.contiguous()
        lin.scale, lin.lds, keep = scale.data_ptr(), scale.stride(0), (*keep, scale)
    if fmt == "ggml":
        if weight.dtype != torch.uint8:
            return None
        lin.type, lin.exact = ggml_type, int(exact)
    return lin, keep


def layer(
    attn: Sequence[tuple[LinearW, tuple] | None],
    router: tuple[LinearW, tuple],
    norms: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    heads: tuple[int, int, int],
    qk_norm: str,
    qk_weights: tuple[torch.Tensor, torch.Tensor] | None,
    qk_eps: float,
    clip: float | None,
    scale: float,
    routing: tuple[int, int, bool, bool, float],
    ffn: str,
    experts: torch.Tensor,
    act: str,
    exact: bool,
    shared: tuple[str, torch.Tensor, tuple[LinearW, tuple] | None] | None = None,
    router_fp32: bool = False,
    mla: MLA | None = None,
) -> Layer | None:
    """One MoE decoder layer: `attn` the q, k, v, o linears (`linear`), `router` a bf16 linear [E, D], `norms` the
    input and post-attention RMSNorm weights (bf16 [D], epsilon `eps`), `heads` (H, Hkv, hd), the q/k norm ("none",
    "full", "head") with its bf16 weights and epsilon, the clip bound (None: none), the softmax scale; `routing`
    (E, K, norm_topk_prob, weights in bf16, routed scaling factor); the experts' fused FFN kernel `ffn` ("bf16",
    "fp8", "ggml"), their packed words `experts` int64 [E, W] (`portable.RoutedTable.words`), `act` and, for GGUF,
    `exact`; `shared`: the shared experts' (fused FFN format, packed words int64 [W], the sigmoid gate's [1, D]
    `linear` or None), or None. None where the kernel does not take it (an activation it lacks, norms not
    contiguous bf16). `router_fp32`: the router's logits stay fp32 (not rounded to bf16). With `mla` (`MLA`) the
    attention is multi-head latent attention: `attn` q_proj (None with a q LoRA), None, None, o_proj; `heads` (H, 1,
    dr)."""
    qk = qk_weights or ()
    tensors = (*norms, *qk)
    if act not in portable.ACTS or any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in tensors):
        return None
    if experts.dtype != torch.int64 or experts.dim() != 2 or not experts.is_contiguous():
        return None
    h, hkv, hd = heads
    e, k, norm_topk, weights_bf16, routed_scale = routing
    bound = 0.0 if clip is None else float(torch.tensor(clip, dtype=torch.bfloat16))  # as torch clamps bf16
    q, kk, v, o = (LinearW() if a is None else a[0] for a in attn)
    struct = LayerW(
        q=q, k=kk, v=v, o=o, router=router[0], ln1=norms[0].data_ptr(), ln2=norms[1].data_ptr(), eps=eps, H=h,
        Hkv=hkv, hd=hd, qk_norm=QK_NORMS[qk_norm], qk_eps=qk_eps, clip_on=int(clip is not None), clip=bound,
        scale=scale, E=e, K=k, norm_topk=int(norm_topk), weights_bf16=int(weights_bf16), routed_scale=routed_scale,
        ffn=FORMATS[ffn], experts=experts.data_ptr(), words=experts.shape[1], act=portable.ACTS[act],
        exact=int(exact),
    )  # fmt: skip
    if qk:
        struct.qw, struct.kw = qk[0].data_ptr(), qk[1].data_ptr()
    struct.shared_ffn, extra = -1, ()
    if shared is not None:
        fmt, words, gate = shared
        if words.dtype != torch.int64 or words.dim() != 1 or not words.is_contiguous():
            return None
        struct.shared_ffn, struct.shared, struct.shared_words = FORMATS[fmt], words.data_ptr(), words.numel()
        if gate is not None:
            struct.shared_gate_on, struct.shared_gate = 1, gate[0]
        extra = (words, gate)
    struct.router_fp32 = int(router_fp32)
    if mla is not None:
        w_kv, lns = mla.w_kv, tuple(t for t in (mla.q_a_ln, mla.kv_a_ln) if t is not None)
        if w_kv.dtype != torch.bfloat16 or not w_kv.is_contiguous() or w_kv.dim() != 3:
            return None
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in lns):
            return None
        r, dn, dr, dv = mla.widths
        m = MLAW(kv_a=mla.kv_a[0], kv_a_ln=mla.kv_a_ln.data_ptr(), latent_eps=mla.eps, R=r, dn=dn, dr=dr, dv=dv)
        m.interleave, m.w_kv = int(mla.interleave), w_kv.data_ptr()
        if mla.q_a is not None and mla.q_b is not None and mla.q_a_ln is not None:
            m.q_a, m.q_b, m.q_a_ln = mla.q_a[0], mla.q_b[0], mla.q_a_ln.data_ptr()
        struct.mla, struct.m = 1, m
        extra = (*extra, mla)
    kept = tuple(a[1] for a in (*attn, router) if a is not None)
    return Layer(struct, (*kept, tensors, experts, extra))


class _Stack(NamedTuple):
    """A run of layers and its caches as the native call takes them (built once per run and KV cache)."""

    layers: ctypes.Array
    keys: ctypes.Array
    values: ctypes.Array
    strides: tuple[int, ...]
    blocks: int
    block_size: int
    top_k: int


def _stack(layers: Sequence[Layer], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> _Stack:
    """KernelError unless the layers' caches are bf16 pools [N, Hkv, bs, hd] of one shape and strides (unit along
    hd), keys like values."""
    if layers[0].struct.mla:  # one latent head a position: the values are the keys' first R values
        values = keys
    want = (keys[0].shape, keys[0].stride())
    for k, v in zip(keys, values, strict=True):
        if k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16 or (k.shape, k.stride()) != want or k.dim() != 4:
            raise KernelError(f"decode layers: KV pools must be bf16 [N, Hkv, bs, hd] alike, got {list(k.shape)}")
        if (v.shape, v.stride()) != want or k.stride(3) != 1:
            raise KernelError(f"decode layers: value pools must match the key pools {list(k.shape)} {k.stride()}")
    n = len(layers)
    structs = (LayerW * n)(*(lay.struct for lay in layers))
    ptrs = [(ctypes.c_void_p * n)(*(t.data_ptr() for t in ts)) for ts in (keys, values)]
    k0 = keys[0]
    top_k = max(lay.struct.K for lay in layers)
    return _Stack(structs, *ptrs, (*k0.stride()[:3], *k0.stride()[:3]), k0.shape[0], k0.shape[2], top_k)


def decode_layers(
    stack: _Stack, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The stack's layers for one new token per row, in place on the residual stream x [B, D] bf16 (contiguous);
    cos, sin [B, hd] (fp32: rotate in fp32, else bf16), block tables [B, M] and positions [B] int64. Returns the
    routed expert ids [layers, B, K] (K the layers' largest; a layer of fewer fills the start of its [B, K]).
    KernelError for bad input (nothing written then)."""
    native = portable.require(lib(), "decode layers", "portable decode", "run the layers as modules")
    b, d = x.shape if x.dim() == 2 else (-1, -1)
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or not 0 < b <= MAX_ROWS:
        raise KernelError(f"decode layers: x must be a contiguous bf16 [B, D] of 1 to {MAX_ROWS} rows, got "
                          f"{x.dtype} {list(x.shape)}")  # fmt: skip
    rot32 = cos.dtype == torch.float32
    hd = stack.layers[0].hd
    if cos.shape != (b, hd) or sin.shape != cos.shape or cos.dtype not in (torch.float32, torch.bfloat16):
        raise KernelError(f"decode layers: cos and sin must be [{b}, {hd}] fp32 or bf16, got {list(cos.shape)}")
    if sin.dtype != cos.dtype or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise KernelError("decode layers: cos and sin need one dtype and strides, unit along hd")
    if tables.dtype != torch.int64 or tables.dim() != 2 or tables.shape[0] != b or positions.shape != (b,):
        raise KernelError(f"decode layers: tables must be int64 [{b}, M] and positions [{b}], got "
                          f"{list(tables.shape)}, {list(positions.shape)}")  # fmt: skip
    tables, positions = tables.contiguous(), positions.to(torch.int64).contiguous()
    ids = torch.empty(len(stack.layers), b, stack.top_k, dtype=torch.int64)
    status = native.tmp_decode_layers(
        stack.layers, len(stack.layers), x.data_ptr(), b, d, cos.data_ptr(), sin.data_ptr(), cos.stride(0), int(rot32),
        stack.keys, stack.values, *stack.strides, stack.blocks, stack.block_size, tables.data_ptr(), tables.shape[1],
        positions.data_ptr(), ids.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status == 2:
        raise KernelError(
            f"decode layers of {b} rows: a layer does not fit the hidden size {d}, or a row's position is past its "
            f"block table or a table entry outside the cache's {stack.blocks} blocks"
        )
    portable.check_status(status, f"decode layers of {b} rows", "portable decode")
    return ids


class PortableDecode(LayerRuns):
    """Which decoder layers of a model run in one native call a decode step, and running them (as
    `kernels.NativeDecode`): `layers[i]` is layer i's `Layer`, or None where it runs as modules. Built once per set
    of weights; per KV cache it keeps each run's stack (the cache weakly referenced)."""

    def __init__(self, layers: Sequence[Layer | None], key: object = None) -> None:
        super().__init__(layers)
        self.key = key
        """What the layers were built for (the model compares it to rebuild them)."""

    def build_stack(self, run: list, keys: list[torch.Tensor], values: list[torch.Tensor]) -> _Stack:
        return _stack(run, keys, values)

    def forward(
        self,
        first: int,
        x: torch.Tensor,
        cache: object,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        tables: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        observe: Callable[[int, torch.Tensor], None],
    ) -> torch.Tensor:
        """The run starting at layer `first` for x [B, 1, D] -> [B, 1, D] in one native call on the KV cache `cache`
        (layer pools `keys`/`values`, block tables [B, M], new positions [B], cos/sin [B, ..., hd]); each layer's
        routed ids [B, K] go to `observe(layer, ids)`."""
        stack = self.stack(first, cache, keys, values)
        b = x.shape[0]
        y = x.reshape(b, -1).clone()  # the residual stream, updated in place
        # through the module, so that a wrapper set on `portable_decode.decode_layers` sees every call
        from tilemem.kernels import portable_decode

        ids = portable_decode.decode_layers(stack, y, cos.reshape(b, -1), sin.reshape(b, -1), tables, positions)
        for j, lay in enumerate(self.runs[first]):
            k = lay.struct.K  # the run's widest in ids; a layer of fewer filled the start of its [B, K]
            observe(first + j, ids[j] if k == ids.shape[2] else ids[j].reshape(-1)[: b * k].view(b, k))
        return y.view(b, 1, -1)
