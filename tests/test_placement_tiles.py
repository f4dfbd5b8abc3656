"""Tiles, keys, formats, budgets parsing and the tile-store layout (pure Python, no tensors)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilemem.models.topology import LayerTopology, Topology
from tilemem.placement.budgets import Budgets
from tilemem.placement.errors import BudgetError, PlanError
from tilemem.placement.formats import tile_format
from tilemem.placement.store_layout import ALIGNMENT, layout, store_order
from tilemem.placement.tiles import DENSE, SHARED, Unit, parse_tile_key, split_ranges, tile_key, unit_bytes
from tilemem.units import format_bytes, parse_bytes


def test_keys_round_trip_for_routed_shared_and_dense():
    for expert, label in ((17, "E17"), (SHARED, "Eshared"), (DENSE, "Edense")):
        key = tile_key(3, expert, "gate_up", 0, 0, 128)
        assert key == f"L3:{label}:gate_up:S0:N0-128"
        unit, group = parse_tile_key(key)
        assert (unit, group) == (Unit(3, expert, 0, 0, 128), "gate_up")


def test_bad_key_names_the_expected_form():
    with pytest.raises(PlanError, match="L3:E17:gate_up:S0:N0-128"):
        parse_tile_key("L3:E17:gate:S0:N0-128")


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 3000), tile=st.integers(1, 512), shards=st.integers(1, 8))
def test_ranges_cover_the_dimension_exactly_once(width, tile, shards):
    ranges = split_ranges(width, tile, shards)
    covered = [n for _, a, b in ranges for n in range(a, b)]
    assert covered == list(range(width))
    assert all(0 < b - a <= tile for _, a, b in ranges)
    # No tile crosses a shard cut; shards are contiguous and in order.
    assert [s for s, _, _ in ranges] == sorted(s for s, _, _ in ranges)


def test_last_tile_is_shorter_when_the_size_does_not_divide():
    assert split_ranges(300, 128) == [(0, 0, 128), (0, 128, 256), (0, 256, 300)]
    assert split_ranges(10, 4, 2) == [(0, 0, 4), (0, 4, 5), (1, 5, 9), (1, 9, 10)]


def test_tile_bytes_are_exact_for_the_dtype():
    bf16, fp32, fp8 = tile_format("bfloat16"), tile_format("fp32"), tile_format("fp8_e4m3")
    assert unit_bytes(128, 2048, bf16) == 3 * 128 * 2048 * 2
    assert unit_bytes(128, 2048, fp32) == 3 * 128 * 2048 * 4
    # fp8: 1 byte per weight plus one fp32 scale per 128 x 128 block (neurons x hidden), per projection.
    assert unit_bytes(128, 2048, fp8) == 3 * 128 * 2048 + 3 * 4 * 16
    assert unit_bytes(160, 200, fp8) == 3 * 160 * 200 + 3 * 4 * 2 * 2  # partial blocks count whole


def test_store_layout_packs_gate_up_then_down_4k_aligned():
    fmt = tile_format("bf16")
    units = [Unit(0, 1, 0, 0, 100), Unit(0, 0, 0, 100, 150), Unit(0, 0, 0, 0, 100), Unit(0, SHARED, 0, 0, 7)]
    entries, total = layout(units, 64, fmt)
    ordered = sorted(units, key=store_order)
    # per layer the shared experts (and a dense FFN) first, then routed experts by (expert, start), as convert writes
    assert [(u.expert, u.start) for u in ordered] == [(SHARED, 0), (0, 0), (0, 100), (1, 0)]
    prev_end = 0
    for u in ordered:
        gu, dn = entries[(u, "gate_up")], entries[(u, "down")]
        assert gu.offset % ALIGNMENT == 0 and gu.offset >= prev_end
        assert gu.nbytes == 2 * u.neurons * 64 * 2 and dn.nbytes == u.neurons * 64 * 2
        assert dn.offset == gu.offset + gu.nbytes  # gate rows, up rows, down columns contiguous
        prev_end = dn.offset + dn.nbytes
    assert total % ALIGNMENT == 0 and total >= prev_end


def test_parse_and_format_bytes():
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    with pytest.raises(BudgetError, match="20GiB"):
        parse_bytes("twenty")


def test_budget_parsing_orders_tiers_and_adds_unbounded_disk():
    b = Budgets.parse("cpu=8GiB, cuda=20GiB")
    assert b.names == ("cuda", "cpu", "disk")
    assert (b.capacity("cuda"), b.capacity("cpu"), b.capacity("disk")) == (20 * 2**30, 8 * 2**30, None)
    b = b.with_cache("cuda=10%")
    assert b.cache_bytes("cuda") == 2 * 2**30
    assert Budgets.parse("cpu=1GiB").names == ("cpu", "disk")


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpu=20GiB", "did you mean 'cpu'"),
        ("cuda20GiB", "has no '='"),
        ("cuda=1GiB,cuda=2GiB", "appears twice"),
        ("cuda=lots", "cannot read"),
        ("", "empty budget"),
    ],
)
def test_bad_budgets_say_what_is_wrong(text, message):
    with pytest.raises(BudgetError, match=message):
        Budgets.parse(text)


def test_experts_per_layer_budget_counts_non_expert_shared_and_k_experts():
    layers = (
        LayerTopology(0, True, 8, 2, 32, 16, 0),
        LayerTopology(1, False, 0, 0, 0, 0, 48),
        LayerTopology(2, True, 8, 2, 32, 16, 0),
    )
    topo = Topology("generic", 64, "bfloat16", 2, layers, (("attn", 1000),))
    b = Budgets.from_experts_per_layer(topo, 3, tile_format("bf16"))
    ffn = 3 * 64 * 2  # bytes per neuron of a gated FFN
    assert b.capacity("cuda") == 1000 + ffn * (16 + 48 + 16) + 3 * 2 * ffn * 32
    assert b.names == ("cuda", "cpu") and b.capacity("cpu") is None
    with pytest.raises(BudgetError, match="exceeds the 8 experts"):
        Budgets.from_experts_per_layer(topo, 9, tile_format("bf16"))
