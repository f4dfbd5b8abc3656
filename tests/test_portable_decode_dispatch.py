"""Which fused decode dispatch a model picks (`models.portable_decode.fused_layers`) where the AVX512 library runs
too: its fused layers first, the portable one-call layers for the layers it leaves (an FP8 or GGUF model's, which it
does not take), both where each takes some. The AVX512 kernels cannot run on every test machine: "the AVX512 library
is available" is patched for the selection, and its layers are stand-ins."""

from __future__ import annotations

import pytest
import torch

from tilemem import kernels
from tilemem.kernels import library, portable_decode
from tilemem.kernels.portable_decode import MAX_ROWS, PortableDecode
from tilemem.loader.checkpoint import load_model
from tilemem.models import model as model_module
from tilemem.models import portable_decode as models_portable

pytestmark = pytest.mark.skipif(not portable_decode.available(), reason="the portable decode layers do not run here")


def select(monkeypatch, model, avx512_layers: set[int], rows: int = 1):
    """The model's dispatch chosen as if the AVX512 library ran, its `native_decode` taking `avx512_layers` (a
    stand-in object each) -> (dispatch, the stand-ins)."""
    stand_ins = {i: object() for i in avx512_layers}
    with monkeypatch.context() as m:
        m.setattr(kernels, "available", lambda: True)
        m.setattr(library, "available", lambda: True)  # `kernels.usable`'s
        m.setattr(model_module.DecoderLayer, "native_decode", lambda layer, rope: stand_ins.get(layer.layer))
        model._native = None
        return model._native_decode(rows), stand_ins


def test_fp8_model_takes_the_portable_layers_where_avx512_fuses_none(make_ckpt, monkeypatch):
    model, _ = load_model(make_ckpt("olmoe", "fp8"), "bf16")
    dispatch, _ = select(monkeypatch, model, set())
    assert isinstance(dispatch, PortableDecode)
    assert None not in dispatch.layers and list(dispatch.runs) == [0]
    assert select(monkeypatch, model, set(), rows=MAX_ROWS + 1)[0] is None  # past the portable call's rows


def test_bf16_model_keeps_the_avx512_layers(make_ckpt, monkeypatch):
    """The bf16 experts go through the AVX512 library's kernels there: the portable layers take none."""
    model, _ = load_model(make_ckpt("olmoe", "bf16"), "bf16")
    n = model.cfg.num_layers
    dispatch, stand_ins = select(monkeypatch, model, set(range(n)))
    assert isinstance(dispatch, kernels.NativeDecode)
    assert dispatch.layers == [stand_ins[i] for i in range(n)]
    dispatch, _ = select(monkeypatch, model, {0})  # layers AVX512 leaves: the portable bf16 FFN does not run there
    assert isinstance(dispatch, kernels.NativeDecode) and list(dispatch.runs) == [0]


def test_runs_go_to_whichever_library_takes_them(make_ckpt, monkeypatch):
    """AVX512 stand-ins at layer 0: the portable run starts at layer 1 and each forward goes to its owner."""
    model, _ = load_model(make_ckpt("olmoe", "fp8"), "bf16")
    n = model.cfg.num_layers
    dispatch, _ = select(monkeypatch, model, {0})
    assert isinstance(dispatch, models_portable.Dispatch)
    assert list(dispatch.native.runs) == [0] and list(dispatch.portable.runs) == [1]
    assert dispatch.portable.layers[0] is None and None not in dispatch.portable.layers[1:]
    cache = model.allocate_paged(4, 4)
    assert [dispatch.run_length(i, cache, cache.keys) for i in range(n)] == [1, n - 1] + [0] * (n - 2)
    calls = []
    monkeypatch.setattr(dispatch.native, "forward", lambda first, *a: calls.append(("avx512", first)))
    monkeypatch.setattr(dispatch.portable, "forward", lambda first, *a: calls.append(("portable", first)))
    x = torch.zeros(1, 1, model.cfg.hidden_size, dtype=torch.bfloat16)
    dispatch.forward(0, x, cache)
    dispatch.forward(1, x, cache)
    assert calls == [("avx512", 0), ("portable", 1)]
    assert model._native_decode(MAX_ROWS + 1) is model._native.native  # more rows: AVX512's alone
