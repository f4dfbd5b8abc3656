"""The probe times each tile format through the kernel the runtime computes it with, on valid tiles of that format."""

from __future__ import annotations

import pytest
import torch

from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import x12_tiles as x12_kernels
from tilemem.placement.formats import tile_format
from tilemem.placement.tiles import unit_bytes
from tilemem.runtime.tile_format import Fp8Tile, X12Tile
from tilemem.tools.probe import _TileTask, packed_tiles, store_format, tile_blocks


def reference(task: _TileTask, block) -> torch.Tensor:
    """scale x FFN of the task's tokens over `block`, in fp32 from the tile's dequantized weights; an FP8 tile's
    hidden activations rounded to the activations' dtype (bf16 here) as its fused kernel rounds them in a bf16
    model (`bf16_h`), an x12 tile's kept fp32 as the x12 tile kernel keeps them."""
    if isinstance(block, X12Tile):
        dense = block.dense().float()  # [3, n, D]
    else:  # FP8: each 128 x 128 block of the [n, D] rows times its scale
        n, d = block.data.shape[1:]
        scale = block.scale.repeat_interleave(128, 1)[:, :n].repeat_interleave(128, 2)[:, :, :d]  # [3, n, D]
        dense = block.data.float() * scale
    x = task.x.float()
    h = torch.nn.functional.silu(x @ dense[0].T) * (x @ dense[1].T)  # [N, n]
    h = h if isinstance(block, X12Tile) else h.to(task.x.dtype).float()
    return h @ dense[2] * task.scale[:, None]  # dense[2]: down^T [n, D]


@pytest.mark.parametrize("fmt,kernel", [("x12", x12_kernels), ("fp8_e4m3", fp8_kernels)])
def test_tile_task_runs_the_runtimes_kernel(fmt, kernel):
    """x12 and FP8 tiles go to their fused kernels where those run (the probe once left them to torch: FP8 through
    its dequantizing path, 10x slower per task than what the runtime runs), with the runtime's result."""
    if not kernel.available():
        pytest.skip(f"the portable {fmt} kernel does not run here")
    blocks, act = tile_blocks(fmt, 2, 128, 256)
    assert isinstance(blocks[0], X12Tile if fmt == "x12" else Fp8Tile) and act == torch.bfloat16
    if fmt == "fp8_e4m3":
        assert blocks[0].nbytes == unit_bytes(128, 256, tile_format(fmt))
    task = _TileTask(256, act, batch=2)
    acc = task.acc()
    assert (acc.x12_act if fmt == "x12" else acc.fp8_act) == "silu"
    got = task(blocks[0])
    torch.testing.assert_close(got, reference(task, blocks[0]), rtol=2e-2, atol=2e-2)
    # the same tiles as a store holds their bytes, viewed per call as the runtime views a cache hit or a read
    codec, raw, _ = packed_tiles(fmt, 2, 128, 256)
    viewed = codec.view(raw[1], 128)
    torch.testing.assert_close(task(viewed), reference(task, viewed), rtol=2e-2, atol=2e-2)


def test_store_format_of_a_bf16_model_is_x12():
    assert store_format("bfloat16", 512) == "x12"  # what `tile_store.convert` packs bf16 tiles of that width as
    assert store_format("bfloat16", 100) == "bfloat16"  # rows x12 cannot hold stay plain
    assert store_format("fp8_e4m3", 512) == "fp8_e4m3"
