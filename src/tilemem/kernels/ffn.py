"""Fused gated FFNs (`csrc/ffn.c`) and a MoE layer's routed experts (`csrc/moe.c`).

Shape legend: T tokens, K experts per token, E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import ctypes

import torch

from tilemem.kernels.library import check, lib
from tilemem.kernels.structs import FfnTask
from tilemem.kernels.workspace import Workspace, threads
from tilemem.kernels.x12 import X12Matrix, x12_all, x12_supported
from tilemem.pages import drop_file_pages

ACTS = {"silu": 0, "gelu": 1, "relu": 2}
"""Activation name -> the kernels' code (`ACT_*` in csrc/internal.h)."""


class ExpertTable:
    """Data pointers of one MoE layer's experts in checkpoint layout, for `moe`. With `compress`, the
    experts are stored as X12Matrix (where every matrix allows it) and the kernels read those: 25%
    fewer bytes per token, the same bits. The bf16 tensors' pages in a mapped checkpoint file are
    then dropped (they come back from the file if anything reads them)."""

    def __init__(
        self, gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor], compress: bool = False
    ) -> None:
        for t in (*gate, *up, *down):
            if not t.is_contiguous() or t.dtype != torch.bfloat16:
                raise ValueError("expert weights must be contiguous bf16 for the native kernels")
        self.intermediate, self.hidden = gate[0].shape
        self.tensors = (gate, up, down)  # keep the storages alive
        ptrs = (torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in self.tensors)
        self.gate, self.up, self.down = ptrs
        self.x12: list[list[X12Matrix]] | None = None
        self.codec_ptrs: tuple[int | None, int | None, int | None] = (None, None, None)
        if compress and all(x12_supported(t) for t in (*gate, *up, *down)):
            e = len(gate)
            flat = x12_all([*gate, *up, *down])
            self.x12 = [flat[:e], flat[e : 2 * e], flat[2 * e :]]
            self._structs = [
                torch.tensor([ctypes.addressof(m.struct) for m in ms], dtype=torch.int64) for ms in self.x12
            ]
            self.codec_ptrs = tuple(t.data_ptr() for t in self._structs)
            drop_file_pages((*gate, *up, *down))

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read for all the experts (stored as X12Matrix or as bf16)."""
        if self.x12 is not None:
            return sum(m.nbytes for ms in self.x12 for m in ms)
        return sum(t.numel() * t.element_size() for ts in self.tensors for t in ts)


def moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, table: ExpertTable, act: str, ws: Workspace
) -> torch.Tensor:
    """sum_k weights[t, k] * expert[ids[t, k]](x[t]) -> [T, D] fp32; x [T, D] bf16, ids/weights [T, K]."""
    x = x.contiguous()
    t, d = x.shape
    ids = ids.to(torch.int64).contiguous()
    w = weights.to(torch.float32).contiguous()
    nthreads = threads()
    scratch, h = ws.get(0, ids.numel() * table.intermediate)
    out = torch.zeros(t, d, dtype=torch.float32)
    status = lib().tm_moe_bf16(
        x.data_ptr(), out.data_ptr(), t, d, table.intermediate, ids.data_ptr(), w.data_ptr(), ids.shape[1],
        table.gate.numel(), table.gate.data_ptr(), table.up.data_ptr(), table.down.data_ptr(), *table.codec_ptrs,
        ACTS[act], nthreads, scratch.data_ptr(), h.data_ptr(),
    )  # fmt: skip
    check(status, f"MoE experts of {t} tokens")
    return out


def ffn_tasks(x: torch.Tensor, tasks: list[tuple], act: str, ws: Workspace, out: torch.Tensor) -> None:
    """out [T, D] fp32 += each task's partial FFN. A task: (block [3, n, D] bf16 with gate, up and
    transposed down rows, token indices [N] int32, scales [N] fp32)."""
    x = x.contiguous()
    t, d = x.shape
    arr = (FfnTask * len(tasks))()
    total = 0
    for q, (block, tok, scale) in enumerate(tasks):
        n = block.shape[1]
        arr[q] = FfnTask(block[0].data_ptr(), block[1].data_ptr(), block[2].data_ptr(), n, d, d, 1, tok.numel(),
                         tok.data_ptr(), scale.data_ptr())  # fmt: skip
        total += n * tok.numel()
    nthreads = threads()
    scratch, h = ws.get((nthreads - 1) * t * d, total)
    status = lib().tm_ffn_tasks_bf16(
        x.data_ptr(), out.data_ptr(), t, d, arr, len(tasks), ACTS[act], nthreads, scratch.data_ptr(), h.data_ptr()
    )
    check(status, f"{len(tasks)} FFN tasks of {t} tokens")
