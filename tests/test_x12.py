"""x12, the lossless 12-bit storage of bf16 expert weights: every weight decodes to its bits, the kernels
give the bf16 path's bits, and the engine keeps one copy of the experts."""

from __future__ import annotations

import pytest
import torch

from tilemem import kernels
from tilemem.errors import ConfigError

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs AVX512-BF16 and a C compiler")


FINITE = (1e-40, -3e-39, 7e-30, -2.5e-12, 3e2, -4e3, 0.0, -0.0)
ODD = (float("inf"), float("-inf"), float("nan"), 1e30, -2e20, *FINITE)


def matrix(n: int, k: int, seed: int, rare: int = 40, odd=ODD) -> torch.Tensor:
    """bf16 weights of a trained-like spread, with `rare` weights of exponents no table has room for
    (subnormals, huge and tiny values; by default infinities and NaN too) at random places, the row ends
    included."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    odd = torch.tensor(odd)
    for j in range(rare):
        r, c = torch.randint(n, (1,), generator=g).item(), torch.randint(k, (1,), generator=g).item()
        w[r, c if j % 5 else k - 1] = odd[j % len(odd)]
    return w


def experts(e: int, i: int, d: int, seed: int):
    return [[matrix(*shape, seed=seed * 100 + 3 * q + m, rare=6, odd=FINITE) for q in range(e)] for m, shape in
            enumerate([(i, d), (i, d), (d, i)])]  # fmt: skip


@pytest.mark.parametrize("n,k", [(1, 32), (5, 96), (64, 2048), (200, 1024)])
def test_every_weight_decodes_to_its_bits(n, k):
    w = matrix(n, k, seed=k)
    m = kernels.X12Matrix(w)
    assert torch.equal(m.decode().view(torch.int16), w.view(torch.int16))  # NaN payloads and -0.0 too
    if n * k >= 4096:
        assert m.exceptions >= 1  # the rare exponents went to the exception list, and still decode
    if n * k >= 65536:
        assert m.nbytes < 0.76 * w.numel() * 2  # 12 bits per weight, plus a few exceptions


def test_x12_refuses_what_it_cannot_store():
    odd_rows, fp32, strided = torch.zeros(4, 48).bfloat16(), torch.zeros(4, 64), torch.zeros(64, 64).bfloat16().t()
    for bad in (odd_rows, fp32, strided):
        with pytest.raises(ValueError, match="x12 needs a contiguous bf16 matrix"):
            kernels.X12Matrix(bad)


@pytest.mark.parametrize("amx", [False, True])
def test_x12_experts_give_the_bf16_kernels_bits(amx):
    """Every path that reads expert rows, on x12 rows: one token (rows decoded in registers), 2-7 tokens
    (dot products on decoded rows), GEMM groups (AVX512 or AMX); rare weights in both halves of chunks."""
    if amx and not kernels.amx_supported():
        pytest.skip("needs a CPU with AMX-BF16")
    e, i, d = 6, 96, 256
    gate, up, down = experts(e, i, d, seed=1)
    plain, packed = kernels.ExpertTable(gate, up, down), kernels.ExpertTable(gate, up, down, compress=True)
    assert packed.x12 is not None and plain.x12 is None
    planes = sum(kernels.x12_row_bytes(w.shape[1]) * w.shape[0] for ws in (gate, up, down) for w in ws)
    assert planes < 0.86 * plain.nbytes  # 12 bits per weight; the 96-weight down rows padded to 128
    assert planes < packed.nbytes < planes + 0.02 * plain.nbytes  # tables, row offsets, exceptions
    before = kernels.amx_enabled()
    gen = torch.Generator().manual_seed(2)
    try:
        kernels.set_amx(amx)
        for t in (1, 2, 3, 7, 20, 70):
            x = torch.randn(t, d, generator=gen).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(e, generator=gen)[:3] for _ in range(t)])
            w = torch.rand(t, 3, generator=gen)
            ws = kernels.Workspace()
            want = kernels.moe(x, w, ids, plain, "silu", ws)
            got = kernels.moe(x, w, ids, packed, "silu", ws)
            assert torch.equal(got, want), t
    finally:
        kernels.set_amx(before)


@pytest.mark.parametrize("n,k", [(12, 96), (40, 2048), (9, 160)])
def test_x12_linear_gives_the_bf16_kernels_bits(n, k):
    """A dense linear on x12 rows, for 1 to 9 tokens: 1 (decoded in registers, one token), 2-4 (decoded in
    registers once for all of them), more (decoded into a buffer): the bf16 kernel's bits; rows past a multiple
    of 4 and a 32-weight tail included."""
    w = matrix(n, k, seed=5 * k + n, rare=8, odd=FINITE)
    c = kernels.X12Matrix(w)
    gen = torch.Generator().manual_seed(n)
    for m in range(1, 10):
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        assert torch.equal(kernels.linear(x, w, c), kernels.linear(x, w)), m


def test_compressed_experts_let_go_of_their_mapped_file_pages(tmp_path):
    """Experts mapped from a checkpoint file, resident (populated), then compressed: the file's pages leave
    the process (they are still in the page cache), so it does not hold both copies."""
    from safetensors.torch import save_file

    from tilemem.loader.safetensors_file import SafetensorsFile
    from tilemem.pages import file_mappings, populate

    gate, up, down = experts(4, 256, 512, seed=3)
    names = {f"{m}.{q}": w for m, ws in zip("gud", (gate, up, down), strict=True) for q, w in enumerate(ws)}
    save_file(names, tmp_path / "experts.safetensors")
    f = SafetensorsFile(tmp_path / "experts.safetensors")
    mapped = [[f.tensor(f"{m}.{q}") for q in range(4)] for m in "gud"]

    def resident() -> int:
        return sum(v["rss"] for v in file_mappings().values() if v["path"] == str(tmp_path / "experts.safetensors"))

    populate(t for ts in mapped for t in ts)
    total = sum(w.numel() * 2 for w in names.values())
    assert resident() >= total
    table = kernels.ExpertTable(*mapped, compress=True)
    assert resident() < 0.02 * total
    x = torch.randn(3, 512).to(torch.bfloat16)
    ids, w = torch.tensor([[0, 1], [2, 3], [3, 0]]), torch.rand(3, 2)
    want = kernels.moe(x, w, ids, kernels.ExpertTable(gate, up, down), "silu", kernels.Workspace())
    assert torch.equal(kernels.moe(x, w, ids, table, "silu", kernels.Workspace()), want)
    assert resident() < 0.02 * total  # the kernels read the x12 copy, not the file


def test_engine_gives_the_same_tokens_with_x12_weights(make_ckpt):
    """The bf16 engine with x12 weights (the default): the same greedy tokens and log-probabilities as
    with bf16 weights, through prefill (GEMMs on decoded projections) and the fused decode step."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    path = make_ckpt("olmoe", "bf16", routing_skew=1.0)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    prompts = ["The capital of France", "Mixture of experts", "a", "x " * 40]  # the last: 80+ prompt tokens
    want = LLM(path, dtype="bf16", weight_codec="none").generate(prompts, params)
    packed = LLM(path, dtype="bf16")  # weight_codec="x12"
    calls = []
    orig = kernels.decode_layers
    kernels.decode_layers = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    try:
        got = packed.generate(prompts, params)
    finally:
        kernels.decode_layers = orig
    blocks = packed.model.moe_blocks()
    assert all(blocks[i].executor.table(i).x12 is not None for i in blocks)
    attn = packed.model.model.layers[0].self_attn
    assert all(m.x12 is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, packed.model.lm_head))
    assert calls  # the fused decode step ran on the x12 weights
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.logprobs for o in got] == [o.logprobs for o in want]
    assert [o.top_logprobs for o in got] == [o.top_logprobs for o in want]


def test_weights_converted_at_load_stay_bf16(make_ckpt):
    """An fp32 checkpoint loaded as bf16 lives in anonymous memory, which x12 could not let go: both copies
    would be held, so the experts stay bf16."""
    from tilemem.engine.llm import LLM

    llm = LLM(make_ckpt("olmoe", "fp32"), dtype="bf16")
    blocks = llm.model.moe_blocks()
    assert all(blocks[i].executor.table(i).x12 is None for i in blocks)


def test_unknown_weight_codec_is_a_clear_error(make_ckpt):
    from tilemem.engine.llm import LLM

    with pytest.raises(ConfigError, match="weight_codec must be one of x12, none"):
        LLM(make_ckpt("olmoe", "bf16"), dtype="bf16", weight_codec="zip")


def test_compressed_linear_gives_the_bf16_linear_bits(tmp_path):
    """A Linear with an x12 weight (a projection, the LM head): decode-sized batches through the native
    kernel (one row decoded in registers, more in chunks of 16), prefill-sized ones through torch on the
    decoded matrix; the same bits as the bf16 weight, which is no longer read."""
    from safetensors.torch import save_file

    from tilemem.layers.linear import Linear, gemm
    from tilemem.loader.safetensors_file import SafetensorsFile
    from tilemem.pages import file_mappings, populate

    w = matrix(384, 320, seed=4, odd=FINITE)
    save_file({"w": w, "b": torch.randn(384).to(torch.bfloat16)}, tmp_path / "lin.safetensors")
    f = SafetensorsFile(tmp_path / "lin.safetensors")
    lin = Linear(320, 384, bias=True)
    lin.weight, lin.bias = torch.nn.Parameter(f.tensor("w"), False), torch.nn.Parameter(f.tensor("b"), False)
    populate([lin.weight])

    def resident() -> int:
        return sum(v["rss"] for v in file_mappings().values() if v["path"] == str(tmp_path / "lin.safetensors"))

    assert resident() >= w.numel() * 2
    assert lin.compress() and lin.x12 is not None
    assert resident() <= 4096  # a page the weight shares with the bias, at most
    gen = torch.Generator().manual_seed(5)
    for rows in (1, 3, 16, 40, 100):
        x = torch.randn(2, rows, 320, generator=gen).to(torch.bfloat16)
        flat = x.reshape(-1, 320)
        if len(flat) <= 4 * kernels.MAX_ROWS:
            want = torch.cat([kernels.linear(flat[i : i + 16], w) for i in range(0, len(flat), 16)]) + lin.bias
        else:
            want = gemm(flat, w, lin.bias)  # torch's product on the bf16 weight (upcast where that is slow)
        assert torch.equal(lin(x).reshape(-1, 384), want), rows


def test_cli_weight_codec_reaches_the_engine(make_ckpt, capsys, monkeypatch):
    from tilemem.cli.main import main
    from tilemem.models.model import MoECausalLM

    path, seen = str(make_ckpt("olmoe", "bf16")), []
    prepare = MoECausalLM.prepare_weights
    monkeypatch.setattr(
        MoECausalLM, "prepare_weights", lambda self, codec, *a: seen.append(codec) or prepare(self, codec)
    )
    outs = []
    for codec in ("none", "x12"):
        argv = ["generate", path, "--prompt", "hi", "--max-tokens", "6", "--temperature", "0", "--weight-codec", codec]
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert seen == ["none", "x12"] and outs[0] == outs[1]
    with pytest.raises(SystemExit):
        main(["generate", path, "--weight-codec", "zip"])
    assert "invalid choice: 'zip'" in capsys.readouterr().err


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_populate_write_backs_all_of_a_fresh_range(threads):
    """The x12 buffers' pages are faulted in by `threads` threads at once: every page of the range, an
    odd length included, and nothing beyond it."""
    import ctypes
    import mmap
    from pathlib import Path

    from tilemem.pages import populate_write

    def anon() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 4]
    libc.mmap.argtypes.append(ctypes.c_long)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, length = 96 << 20, (64 << 20) + 3 * 4096 + 17
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    addr = libc.mmap(None, size, prot, flags, -1, 0)
    try:
        before = anon()
        assert populate_write(addr, length, threads)
        grown = anon() - before
        assert length - 4096 <= grown <= length + (4 << 20)  # the range, not the 32 MiB after it
    finally:
        libc.munmap(addr, size)
