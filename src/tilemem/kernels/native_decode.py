"""The native decode step: a run of consecutive MoE decoder layers in one call (`csrc/decode_layers.c`).

A model builds one `NativeDecode` from its layers' `DecodeLayer`s (`decode_layer`, None where a layer must
run as modules) once its weights are in place; which layers fuse is decided then, not at every step. Per
KV cache it keeps each run's `DecodeStack`; per decode step, `forward` runs a run in one call and hands the
routed expert ids to the model's observers.

Shape legend: B rows, D hidden, K experts per token, E experts, hd head width.
"""

from __future__ import annotations

import ctypes
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from tilemem.errors import KernelError
from tilemem.kernels.attention import block_tables, check_pools
from tilemem.kernels.ffn import ACTS, ExpertTable
from tilemem.kernels.library import check, lib
from tilemem.kernels.structs import AttnLayer, DecodeLayer
from tilemem.kernels.workspace import Workspace, threads


def decode_layer(
    attn: AttnLayer,
    norms: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    router: torch.Tensor,
    table: ExpertTable,
    act: str,
    experts: int,
    top_k: int,
    norm_topk: bool,
    weights_bf16: bool,
    routed_scale: float,
    fp32_rotate: bool,
) -> DecodeLayer | None:
    """One MoE decoder layer for the native decode step: its attention (`AttnLayer`), input and
    post-attention RMSNorm weights [D] (`eps`), router [E, D], `experts` (E, in `table`) and softmax top-k
    routing options; None where the kernel cannot take them (weights not contiguous bf16, an activation it lacks).
    The caller keeps the tensors alive."""
    if act not in ACTS or any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in (*norms, router)):
        return None
    attn.fp32_rotate = int(fp32_rotate)  # x is bf16: cos/sin are fp32 only for fp32 rotation
    return DecodeLayer(
        attn, norms[0].data_ptr(), norms[1].data_ptr(), eps, router.data_ptr(), table.gate.data_ptr(),
        table.up.data_ptr(), table.down.data_ptr(), experts, top_k, table.intermediate, ACTS[act],
        norm_topk, weights_bf16, routed_scale, *table.codec_ptrs,
    )  # fmt: skip


class DecodeStack:
    """Consecutive MoE decoder layers for `decode_layers`: their `DecodeLayer`s and paged KV cache layers
    (pools [N, Hkv, bs, hd], the same N and bs for every layer), as the native call takes them (built once
    per run of layers and cache; the rows' block tables come with each call). It keeps the `DecodeLayer`s
    alive but not the cache: the caller rebuilds it when the cache is replaced."""

    def __init__(self, layers: list[DecodeLayer], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for k, v in zip(keys, values, strict=True):
            check_pools(k, v)
            if (k.shape[0], k.shape[2]) != (keys[0].shape[0], keys[0].shape[2]):
                raise KernelError(
                    f"a fused decode run needs KV pools of the same blocks in every layer, got "
                    f"{list(keys[0].shape)} and {list(k.shape)}"
                )
        self.sources = layers
        self.n = len(layers)
        self.layers = (DecodeLayer * self.n)(*layers)
        self.keys = (ctypes.c_void_p * self.n)(*(k.data_ptr() for k in keys))
        self.values = (ctypes.c_void_p * self.n)(*(v.data_ptr() for v in values))
        self.blocks, self.block_size = keys[0].shape[0], keys[0].shape[2]
        self.top_k = layers[0].K
        self.ws_per_row = max(lay.E + 2 * (lay.attn.H + lay.attn.Hkv) * lay.attn.hd for lay in layers)
        self.h_per_row = max(lay.K * lay.I for lay in layers)


def decode_layers(
    stack: DecodeStack,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    ws: Workspace,
) -> torch.Tensor:
    """The stack's decoder layers for one new token per row, in place on the residual stream x [B, D] bf16
    (see `tm_decode_layers_bf16`); cos/sin [B, hd], block tables [B, M] and positions [B] as in
    `attn_decode`. Returns the routed expert ids [layers, B, K]."""
    b, d = x.shape
    tables = block_tables(tables, positions, b)
    m = tables.shape[1]
    nthreads = threads()
    sc_n, ws_n = nthreads * m * stack.block_size, b * (2 * d + stack.ws_per_row)
    scratch, buf = ws.get(sc_n + b * (d + stack.top_k), ws_n + b * stack.h_per_row)
    ids = torch.empty(stack.n, b, stack.top_k, dtype=torch.int64)
    status = lib().tm_decode_layers_bf16(
        stack.layers, stack.n, x.data_ptr(), b, d, cos.data_ptr(), sin.data_ptr(), stack.keys, stack.values,
        stack.blocks, stack.block_size, tables.data_ptr(), m, positions.data_ptr(), nthreads, buf.data_ptr(),
        scratch.data_ptr(), scratch.data_ptr() + 4 * sc_n, buf.data_ptr() + 2 * ws_n, ids.data_ptr(),
    )  # fmt: skip
    check(status, f"decode step of {stack.n} layers, {b} rows")
    return ids


class LayerRuns(ABC):
    """A model's decoder layers for a fused decode step: `layers[i]` is layer i's description for the kernel, or
    None where it runs as modules; every run of consecutive described layers is one native call (`NativeDecode`,
    `portable_decode.PortableDecode`)."""

    def __init__(self, layers: Sequence[object | None]) -> None:
        self.layers = list(layers)  # alive while the native stacks point at them
        self.runs: dict[int, list] = {}
        """First layer -> the run that starts there."""
        i = 0
        while i < len(self.layers):
            run = []
            while i + len(run) < len(self.layers) and self.layers[i + len(run)] is not None:
                run.append(self.layers[i + len(run)])
            if run:
                self.runs[i] = run
            i += max(1, len(run))
        self._stacks: dict[int, object] = {}
        # The cache by weak reference: a stack must not keep a replaced KV cache's memory alive.
        self._cache: Callable[[], object | None] = lambda: None

    def stack(self, first: int, cache: object, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> object:
        """The native stack of the run at layer `first` over the KV cache `cache` (layer pools `keys`/`values`),
        built once per cache by `build_stack`."""
        if self._cache() is not cache:
            self._stacks.clear()
            self._cache = weakref.ref(cache)
        if (stack := self._stacks.get(first)) is None:
            span = range(first, first + len(self.runs[first]))
            run_keys, run_values = [keys[i] for i in span], [values[i] for i in span]
            stack = self._stacks[first] = self.build_stack(self.runs[first], run_keys, run_values)
        return stack

    @abstractmethod
    def build_stack(self, run: list, keys: list[torch.Tensor], values: list[torch.Tensor]) -> object:
        """The library's stack of one run of layers over their KV pools (each library's own)."""

    def run_length(self, first: int, cache: object, keys: Sequence[torch.Tensor]) -> int:
        """Layers of the run that starts at layer `first` (0: none, the layer runs as modules) for the KV cache
        `cache` with layer caches `keys` (a run needs bf16 caches)."""
        run = self.runs.get(first)
        if run is None or any(keys[i].dtype != torch.bfloat16 for i in range(first, first + len(run))):
            return 0
        return len(run)


class NativeDecode(LayerRuns):
    """Which decoder layers of a model run fused in a decode step, and running them.

    `layers[i]` is layer i's `DecodeLayer`, or None where it runs as modules; every run of consecutive
    fused layers is one native call. Built once per set of weights (the model rebuilds it when its weights
    or expert executor change)."""

    def __init__(self, layers: Sequence[DecodeLayer | None]) -> None:
        super().__init__(layers)
        self._ws = Workspace()

    def build_stack(self, run: list, keys: list[torch.Tensor], values: list[torch.Tensor]) -> DecodeStack:
        return DecodeStack(run, keys, values)

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
        """The run starting at layer `first` (see `run_length`) for x [B, 1, D] -> [B, 1, D]: one native call
        on the KV cache `cache` (layer pools `keys`/`values` [N, Hkv, bs, hd], rows' block tables `tables`
        [B, M], new tokens at `positions` [B]);
        each layer's routed ids [B, K] go to `observe(layer, ids)` as the module path would send them."""
        stack = self.stack(first, cache, keys, values)
        b = x.shape[0]
        y = x.reshape(b, -1).clone()  # the residual stream, updated in place by the kernel
        # through the package, so that a wrapper set on `kernels.decode_layers` sees every call (imported
        # here: the package imports this module)
        from tilemem import kernels

        ids = kernels.decode_layers(stack, y, cos.reshape(b, -1), sin.reshape(b, -1), tables, positions, self._ws)
        for j in range(stack.n):
            observe(first + j, ids[j])
        return y.view(b, 1, -1)
