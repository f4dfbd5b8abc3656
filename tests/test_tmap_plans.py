"""TMAP hardware profiles, recommendation, --budget auto and the `tmap predict` CLI."""

from __future__ import annotations

import argparse
import json

import pytest
from test_tmap_model import _small_problem, measured_like_hw, plan_for

from tilemem.placement.errors import BudgetError
from tilemem.placement.profile import Profile
from tilemem.tmap import HardwareError, HardwareProfile, ServingWorkload, hardware_profile, predict, reference_profiles
from tilemem.tmap.auto import auto_budget, resolve_auto
from tilemem.tmap.recommend import ExtrapolationError, confidence, recommend


def test_profile_json_roundtrip_is_atomic(tmp_path):
    hw = measured_like_hw()
    path = hw.save(tmp_path / "hw.json")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = HardwareProfile.load(path)
    assert again == hw
    data = json.loads(path.read_text())
    assert data["schema_version"] == "tilemem_hardware_v1"
    assert {"vram_capacity_gib", "dram_bandwidth_gbps", "transfer_bandwidth_gbps", "disk"} <= set(data)


def test_a_missing_hardware_profile_is_refused(tmp_path):
    with pytest.raises(HardwareError, match="does not exist"):
        HardwareProfile.load(tmp_path / "missing.json")


def test_a_hardware_profile_with_a_misspelt_field_is_refused(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "dram_bandwith_gbps": 3}))
    with pytest.raises(HardwareError, match="unknown fields"):
        HardwareProfile.load(tmp_path / "bad.json")


def test_a_negative_hardware_figure_is_refused():
    with pytest.raises(HardwareError, match="negative"):
        hardware_profile("neg", dram_bandwidth_gbps=-1.0)


def test_an_unknown_hardware_figure_is_refused():
    with pytest.raises(HardwareError, match="unknown hardware figures"):
        hardware_profile("typo", dram_bandwith_gbps=1.0)


def test_reference_profiles_are_marked_not_measured():
    names = reference_profiles()
    assert {"consumer_24gb_gpu_ddr5", "cpu_laptop_nvme", "rtx5090_ddr"} <= set(names)
    for name in names:
        hw = HardwareProfile.load(name)
        assert not hw.measured
        assert "NOT measured" in hw.summary()[0][1]


def test_seed_style_hand_profile():
    hw = hardware_profile(
        name="rtx5090_ddr", vram_capacity_gib=32.0, vram_bandwidth_gbps=1792.0, vram_latency_ns=350.0,
        dram_capacity_gib=128.0, dram_bandwidth_gbps=95.0, dram_latency_ns=90.0,
        transfer_bandwidth_gbps=64.0, transfer_latency_us=12.0,
    )  # fmt: skip
    assert hw.has_gpu and not hw.measured
    spb, _, notes = hw.kernel("cpu", "bfloat16", 1)
    assert spb == pytest.approx(1 / 95e9)
    assert notes


def test_disk_lookup_interpolates_and_notes():
    hw = measured_like_hw()
    bw, per, notes = hw.disk_read(4096, 4)
    assert per == pytest.approx(130e-6) and not notes
    _, mid, _ = hw.disk_read((4096 + (1 << 20)) // 2, 4)
    assert 130e-6 < mid < 2700e-6
    _, _, notes = hw.disk_read(8 << 20, 4)
    assert any("outside the measured" in n for n in notes)
    _, _, notes = hw.disk_read(4096, 8)
    assert any("queue depth 8 not measured" in n for n in notes)


def test_confidence_is_a_probability():
    assert confidence(1.0, 1.0, 0.15) == pytest.approx(0.5)
    assert confidence(2.0, 1.0, 0.15) > 0.99
    assert confidence(1.0, 2.0, 0.15) < 0.01


def test_recommend_table_and_kt_fallback():
    topo, profile = _small_problem()
    budget = f"cpu={topo.non_expert_bytes + topo.routed_expert_bytes // 3}B"
    rec = recommend(topo, profile, measured_like_hw(), budget, tiles=(16, 32), model="m")
    assert len(rec.candidates) == 6 * 2
    speeds = [c.prediction.decode_tok_s for c in rec.candidates]
    assert speeds == sorted(speeds, reverse=True)
    assert rec.best is rec.candidates[0]
    assert 0.5 <= rec.confidence <= 1.0
    # demand an impossible gain: the simpler kt_expert is recommended
    fallback = recommend(topo, profile, measured_like_hw(), budget, tiles=(16,), min_gain=10.0, model="m")
    assert fallback.recommended.policy == "kt_expert"
    assert "simpler" in fallback.reason or fallback.best.policy == "kt_expert"


def test_extrapolation_is_refused_then_marked():
    topo, profile = _small_problem()
    budget = f"cpu={topo.total_bytes}B"
    laptop = HardwareProfile.load("cpu_laptop_nvme")
    with pytest.raises(ExtrapolationError, match="allow-extrapolation"):
        recommend(topo, profile, laptop, budget, tiles=(16,))
    rec = recommend(topo, profile, laptop, budget, tiles=(16,), allow_extrapolation=True, model="m")
    assert rec.extrapolated and "tilemem doctor --probe" in rec.probe_hint
    # a budget beyond the machine's DRAM is outside what was measured, even on a measured profile
    with pytest.raises(ExtrapolationError, match="exceeds the machine"):
        recommend(topo, profile, measured_like_hw(), "cpu=64GiB", tiles=(16,))
    with pytest.raises(ExtrapolationError, match="no GPU"):
        recommend(topo, profile, measured_like_hw(), f"cuda={topo.total_bytes}B", tiles=(16,))


def test_budget_auto_never_exceeds_free_memory(monkeypatch):
    topo, _ = _small_problem()
    monkeypatch.setenv("TILEMEM_FAKE_RAM", str(topo.total_bytes // 2))
    ab = auto_budget(topo, context=64)
    assert ab.cpu_bytes <= (topo.total_bytes // 2) * 0.85
    assert ab.cuda_bytes == 0
    assert ab.text == f"cpu={ab.cpu_bytes}B"
    # plenty of RAM: capped at what the model needs
    monkeypatch.setenv("TILEMEM_FAKE_RAM", "64GiB")
    assert auto_budget(topo, context=64).cpu_bytes == topo.total_bytes
    # too little for the non-expert weights: a clear error
    monkeypatch.setenv("TILEMEM_FAKE_RAM", str(topo.non_expert_bytes))
    with pytest.raises(BudgetError, match="non-expert weights"):
        auto_budget(topo, context=64)


def test_budget_auto_plans_fit(monkeypatch):
    from tilemem.placement.budgets import Budgets
    from tilemem.placement.formats import tile_format
    from tilemem.placement.planner import build_plan
    from tilemem.placement.policies import PlacementProblem

    topo, profile = _small_problem()
    fake = (4 << 20) + (1 << 20)  # the KV cache of 4096 tokens takes 4 MiB of it
    monkeypatch.setenv("TILEMEM_FAKE_RAM", str(fake))
    lines = []
    budget, policy, tile = resolve_auto(topo, "auto", "auto", profile, 16, measured_like_hw(), log=lines.append)
    plan = build_plan(PlacementProblem(topo, profile, Budgets.parse(budget), tile_format(topo.dtype), tile), policy)
    assert plan.usage("cpu").used <= (fake - (4 << 20)) * 0.85 < topo.total_bytes
    assert any("--budget auto" in s for s in lines) and any("--policy auto" in s for s in lines)


def test_auto_uses_a_saved_measured_profile_and_says_so(tmp_path, monkeypatch):
    from tilemem.tmap import auto

    saved = measured_like_hw().save(tmp_path / "hw.json")
    monkeypatch.setenv("TILEMEM_HARDWARE", str(saved))
    lines = []
    hw = auto.default_hardware(log=lines.append)
    assert hw.measured and hw.name == "like"
    assert len(lines) == 1 and "like (measured)" in lines[0] and str(saved) in lines[0]


def test_auto_without_a_saved_profile_takes_the_closest_reference_and_never_probes(tmp_path, monkeypatch):
    import tilemem.tools.probe as probe_module
    from tilemem.tmap import auto
    from tilemem.tmap.hardware import closest_reference, reference_profiles

    monkeypatch.delenv("TILEMEM_HARDWARE", raising=False)
    monkeypatch.setattr(auto, "DEFAULT_HARDWARE", tmp_path / "none.json")
    monkeypatch.setattr(probe_module, "probe", lambda *a, **k: pytest.fail("auto must not probe"))
    monkeypatch.setenv("TILEMEM_FAKE_RAM", "30GiB")  # a 30 GiB machine without a GPU
    monkeypatch.chdir(tmp_path)
    lines = []
    hw = auto.default_hardware(log=lines.append)
    assert not hw.measured and hw.name in reference_profiles()
    assert hw.name == "cpu_laptop_nvme" and not hw.has_gpu
    assert len(lines) == 1 and "reference 'cpu_laptop_nvme'" in lines[0] and "doctor --probe" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
    assert closest_reference(128.0, 32.0).name == "rtx5090_ddr"
    assert closest_reference(64.0, 24.0).name == "consumer_24gb_gpu_ddr5"

    topo, profile = _small_problem()
    monkeypatch.setenv("TILEMEM_FAKE_RAM", str(topo.total_bytes * 4))
    budget, policy, _ = auto.resolve_auto(topo, "auto", "auto", profile, 16, log=lines.append)
    assert policy != "auto" and budget.startswith("cpu=")
    assert any("reference 'cpu_laptop_nvme'" in s for s in lines[1:])


def _cli(argv):
    from tilemem.cli import tmap_commands

    parser = argparse.ArgumentParser(prog="tilemem")
    tmap_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_predict(tmp_path, capsys):
    topo, _ = _small_problem()
    from tilemem.synth.presets import resolve_preset

    _, fields = resolve_preset("olmoe", "tiny")
    cfg = dict(fields, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2, intermediate_size=64)
    cfg |= {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hw = measured_like_hw().save(tmp_path / "hw.json")
    budget = f"cpu={topo.non_expert_bytes + topo.routed_expert_bytes // 2}B"
    code = _cli(["tmap", "predict", str(tmp_path / "config.json"), "--hardware", str(hw), "--budget", budget,
                 "--tiles", "16,32", "--json", str(tmp_path / "t.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "recommended:" in out and "<- recommended" in out and "confidence" in out
    assert json.loads((tmp_path / "t.json").read_text())["tables"][0]["recommended"]["policy"]
    from tilemem.errors import TileMemError

    with pytest.raises(TileMemError, match="allow-extrapolation"):
        _cli(["tmap", "predict", str(tmp_path / "config.json"), "--hardware", "cpu_laptop_nvme", "--budget", budget])
    code = _cli(["tmap", "predict", str(tmp_path / "config.json"), "--hardware", "cpu_laptop_nvme", "--budget",
                 budget, "--tiles", "16", "--allow-extrapolation"])  # fmt: skip
    out = capsys.readouterr().out
    assert "QUICK-PLANNING ESTIMATE" in out and "confirm with: tilemem doctor --probe" in out


def test_uniform_profile_needs_no_checkpoint():
    """From the uniform prior alone: the table is fastest first, the best candidate heads it, and each
    figure is exactly what `predict` gives for that policy's plan of this topology."""
    topo, _ = _small_problem()
    uniform, budget = Profile.uniform(topo), f"cpu={topo.total_bytes // 2}B"
    rec = recommend(topo, uniform, measured_like_hw(), budget, tiles=(16,))
    speeds = [c.prediction.decode_tok_s for c in rec.candidates]
    assert speeds == sorted(speeds, reverse=True) and rec.best == rec.candidates[0]
    assert rec.recommended in rec.candidates and len({c.policy for c in rec.candidates}) == len(rec.candidates) > 1
    for c in rec.candidates:
        plan = plan_for(topo, uniform, budget, c.policy, tile=16)
        expected = predict(plan, measured_like_hw(), ServingWorkload(uniform)).decode_tok_s
        assert c.prediction.decode_tok_s == pytest.approx(expected, rel=1e-9), c.policy


def test_validation_agreement_follows_the_recommendation():
    from tilemem.tools.validate import ValidationReport, ValidationRow, agreement

    def row(policy, predicted, measured, low, high):
        return ValidationRow("mixed", "35%", policy, predicted, measured, low, high, 2, 0.1, 0.1, 20.0, 21.0, True)

    # a near-tie in prediction: TMAP recommends kt_expert, which is the measured best
    tie = [row("kt_expert", 31.55, 30.97, 30.8, 31.2), row("tilepo_coarse", 31.59, 25.5, 23.7, 27.3)]
    a = agreement(tie)
    assert (a.predicted_best, a.recommended, a.measured_best, a.agree) == (
        "tilepo_coarse",
        "kt_expert",
        "kt_expert",
        True,
    )
    # a clear predicted gain that the measurement contradicts beyond its spread
    wrong = [row("kt_expert", 30.0, 40.0, 39.0, 41.0), row("tilepo_fine", 40.0, 30.0, 29.0, 31.0)]
    assert not agreement(wrong).agree
    # within the measured spread counts as agreement
    close = [row("kt_expert", 30.0, 40.0, 36.0, 41.0), row("tilepo_fine", 40.0, 38.0, 35.0, 39.0)]
    assert agreement(close).agree
    rows = tuple(tie)
    rep = ValidationReport("m", "hw", 2, rows, (a,), 0.05, 1.0, 1.0, (0.5, 0.6))
    assert rep.passed and "agree" in rep.table() and rep.validation().budget_fractions == (0.35,)


def test_median_profile_takes_each_figure_from_its_rounds():
    """`HardwareProfile.median`: every float figure (scalars, kernels, disk, fetch) the median of the rounds, kernel
    figures matched by (device, dtype, batch) wherever they sit in each round's list, a figure only some rounds have
    the median of those; the rest from the first round, and the round count in meta."""
    from dataclasses import replace

    from tilemem.tmap.hardware import FetchFigure, KernelFigure

    base = measured_like_hw()
    rounds = []
    for i, bw in enumerate((30.0, 10.0, 20.0)):
        kernels = [replace(k, bandwidth_gbps=k.bandwidth_gbps * bw / 10, task_overhead_us=float(i)) for k in
                   base.kernels]  # fmt: skip
        if i == 2:  # another order, and a figure the other rounds lack
            kernels = kernels[::-1] + [KernelFigure("cpu", "x12", 1, 7.0, 9.0, 3.0)]
        rounds.append(
            replace(
                base, name=f"r{i}", dram_bandwidth_gbps=bw, layer_overhead_us=100.0 * (i + 1), kernels=tuple(kernels),
                fetch=(FetchFigure(1 << 20, 4, 50.0 + i, 700.0 - 100 * i),), meta={"round": i},
            )
        )  # fmt: skip
    m = HardwareProfile.median(rounds)
    assert m.name == "r0" and m.meta == {"round": 0, "probe_rounds": 3}
    assert m.dram_bandwidth_gbps == 20.0 and m.layer_overhead_us == 200.0
    assert m.step_overhead_us == base.step_overhead_us and m.cpu_threads == base.cpu_threads
    got = {(k.dtype, k.batch): k for k in m.kernels}
    for k in base.kernels:  # medians of x3, x1, x2 of the base figure; overheads 0, 1, 2
        assert got[(k.dtype, k.batch)].bandwidth_gbps == pytest.approx(2 * k.bandwidth_gbps)
        assert got[(k.dtype, k.batch)].task_overhead_us == 1.0
    assert got[("x12", 1)].bandwidth_gbps == 7.0
    assert m.fetch == (FetchFigure(1 << 20, 4, 51.0, 600.0),)
    assert {(d.request_bytes, d.queue_depth) for d in m.disk} == {(d.request_bytes, d.queue_depth) for d in base.disk}
    assert HardwareProfile.median(rounds[:1]) is rounds[0]
    with pytest.raises(ValueError, match="at least one"):
        HardwareProfile.median([])


def test_validate_probes_before_every_bench_round(make_ckpt, tmp_path, monkeypatch):
    """Without --hardware, `tmap validate` runs a probe before each of the bench's rounds (run_bench's before_round
    hook, called once per repeat) and predicts from the median of those profiles, which it saves."""
    from tilemem.bench import runner
    from tilemem.tools import probe as probe_mod
    from tilemem.tools import validate as validate_mod

    path = make_ckpt("olmoe", "bf16")
    order = []
    rounds = [measured_like_hw(), measured_like_hw(), measured_like_hw()]
    rounds = [
        r.__class__(**{**r.__dict__, "dram_bandwidth_gbps": bw})
        for r, bw in zip(rounds, (9.0, 30.0, 12.0), strict=True)
    ]

    def fake_probe(config, log=print):
        order.append("probe")
        return rounds[len([o for o in order if o == "probe"]) - 1]

    def fake_bench(spec, progress=True, before_round=None):
        rows = []
        for rep in range(spec.repeats):
            before_round(rep)
            order.append("round")
            for b in spec.budgets:
                for p in spec.policies:
                    rows.append(dict(workload="mixed", budget=b, policy=p, decode_tok_s=10.0 + rep, hit_rate=0.5,
                                     p50_ms=100.0, prompt_tokens=8, plan_checksum="x"))  # fmt: skip
        return {"rows": rows}

    monkeypatch.setattr(probe_mod, "probe", fake_probe)
    monkeypatch.setattr(runner, "run_bench", fake_bench)
    rep = validate_mod.validate(
        path, budgets=("35%",), policies=("kt_expert",), repeats=3, out=tmp_path / "v", log=lambda _s: None
    )
    assert order == ["probe", "round"] * 3
    saved = HardwareProfile.load(tmp_path / "v" / "hardware.json")
    assert saved.dram_bandwidth_gbps == 12.0 and saved.meta["probe_rounds"] == 3
    assert len(rep.rows) == 1 and rep.rows[0].runs == 3 and rep.rows[0].measured == 11.0
