"""Native CPU kernels (AVX512-BF16): fused expert FFNs, decode attention and small-batch linears.
On CPUs with AMX-BF16, the expert FFNs' prefill GEMMs run on AMX tiles (`set_amx`, `TILEMEM_AMX`).

The C sources in `csrc/` (one header, `tilemem.h`, and a file per role) are compiled on first use into
one shared library and checked at load (`library`). Where the CPU lacks AVX512-BF16, no compiler is
found, the library's interface differs from Python's, or `TILEMEM_KERNELS=0`, `available()` is False and
callers keep their torch path (same results up to bf16 rounding order).

Modules: `library` (build, load, ABI check, switches), `structs` (ctypes mirrors of the C structs),
`workspace` (scratch buffers), `x12` (the 12-bit lossless codec), `linear_norm`, `ffn` (fused FFN tasks,
a MoE layer's experts), `attention`, `native_decode` (a decode step's run of MoE decoder layers).

Shape legend: T tokens, K experts per token, E experts, D hidden, I expert intermediate.
"""

from tilemem.kernels.attention import attn_decode, attn_prefill
from tilemem.kernels.ffn import ACTS, ExpertTable, ffn_tasks, moe
from tilemem.kernels.library import (
    amx_enabled,
    amx_supported,
    available,
    build,
    cache_dir,
    cpu_supported,
    set_amx,
    usable,
)
from tilemem.kernels.linear_norm import MAX_ROWS, linear, rms_norm
from tilemem.kernels.native_decode import DecodeStack, NativeDecode, decode_layer, decode_layers
from tilemem.kernels.structs import X12, AttnLayer, DecodeLayer, FfnTask
from tilemem.kernels.workspace import Workspace
from tilemem.kernels.x12 import X12_SAMPLE_ROWS, X12_SPILL, X12Matrix, decoded, x12_row_bytes, x12_supported

__all__ = [
    "ACTS",
    "MAX_ROWS",
    "X12",
    "X12_SAMPLE_ROWS",
    "X12_SPILL",
    "AttnLayer",
    "DecodeLayer",
    "DecodeStack",
    "ExpertTable",
    "FfnTask",
    "NativeDecode",
    "Workspace",
    "X12Matrix",
    "amx_enabled",
    "amx_supported",
    "attn_decode",
    "attn_prefill",
    "available",
    "build",
    "cache_dir",
    "cpu_supported",
    "decode_layer",
    "decode_layers",
    "decoded",
    "ffn_tasks",
    "linear",
    "moe",
    "rms_norm",
    "set_amx",
    "usable",
    "x12_row_bytes",
    "x12_supported",
]
