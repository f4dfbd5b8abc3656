"""Profiles: recorded on a synthetic checkpoint, skew visible, versioned, mergeable, model-checked;
workloads built-in or JSONL."""

import json

import pytest

from tilemem.errors import ConfigError
from tilemem.models.topology import Topology
from tilemem.placement.errors import ProfileError
from tilemem.placement.profile import PROFILE_SCHEMA, REUSE_MAX, Profile, merge_profiles
from tilemem.tools.profiler import profile_checkpoint
from tilemem.workloads import builtin_workloads, load_workload


@pytest.fixture(scope="module")
def skewed(make_ckpt):
    return make_ckpt("olmoe", dtype="bf16", routing_skew=2.0)


@pytest.fixture(scope="module")
def profile(skewed):
    return profile_checkpoint(skewed, load_workload("mixed"), tokens=48)


def test_profile_records_phases_coactivation_and_reuse(profile):
    assert profile.model.moe_layers == (0, 1) and profile.model.num_experts == 8
    for lp in profile.layers:
        assert lp.prefill_tokens > 0 and lp.decode_tokens > 0
        assert lp.prefill_tokens + lp.decode_tokens == 48
        assert sum(lp.prefill_counts) == 2 * lp.prefill_tokens  # top-2 routing
        assert sum(lp.decode_counts) == 2 * lp.decode_tokens
        assert all(i < j for i, j, _ in lp.coactivation)
        assert sum(c for _, _, c in lp.coactivation) == lp.tokens()  # one pair per token at top-2
        # Every decode activation is either a first use in its sequence or a reuse.
        assert sum(lp.reuse_hist) + lp.reuse_first == sum(lp.decode_counts)
        assert len(lp.reuse_hist) == REUSE_MAX + 1


def test_routing_skew_shows_in_the_profile(profile):
    # Uniform routing puts 25% of the mass on the top quarter of experts; skew 2 concentrates it.
    assert min(lp.top_share(0.25) for lp in profile.layers) > 0.5


def test_save_load_merge(profile, tmp_path):
    path = profile.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == PROFILE_SCHEMA
    loaded = Profile.load(path)
    assert loaded == profile and loaded.digest() == profile.digest()
    merged = merge_profiles([profile, loaded])
    assert merged.total_tokens == 2 * profile.total_tokens
    assert merged.layers[0].prefill_counts == tuple(2 * c for c in profile.layers[0].prefill_counts)
    assert merged.probabilities(0) == pytest.approx(profile.probabilities(0))


def test_profile_for_another_model_is_refused(profile, make_ckpt):
    from tilemem.loader.checkpoint import Checkpoint

    other = Topology.from_config(Checkpoint.open(make_ckpt("qwen2_moe")).config)
    with pytest.raises(ProfileError, match=r"2 layers \(MoE: 0, 1\).*3 layers \(MoE: 0, 2\).*tilemem profile"):
        profile.check_matches(other)
    with pytest.raises(ProfileError, match="different models"):
        profile.merge(Profile.uniform(other))


def test_a_profile_that_is_not_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(bad)


def test_a_profile_of_another_schema_version_is_a_clear_error(tmp_path, profile):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**profile.to_dict(), "schema_version": "tilemem_profile_v0"}))
    with pytest.raises(ProfileError, match="schema_version 'tilemem_profile_v0'"):
        Profile.load(bad)


def test_a_profile_with_malformed_counts_is_a_clear_error(tmp_path, profile):
    data = profile.to_dict()
    data["layers"][0]["prefill_counts"] = [1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="malformed"):
        Profile.load(bad)


def test_a_missing_profile_file_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        Profile.load(tmp_path / "missing.json")


def test_builtin_workloads_need_no_download():
    assert builtin_workloads() == ["mixed", "long_context", "code", "chat"]
    for name in builtin_workloads():
        w = load_workload(name)
        assert w.requests and all((r.prompt or r.messages) and r.max_new_tokens > 0 for r in w.requests)
        assert load_workload(name) == w  # deterministic


def test_jsonl_workload_and_its_errors(tmp_path, skewed):
    good = tmp_path / "w.jsonl"
    good.write_text(
        '{"prompt": "def fib(n):", "max_tokens": 4}\n\n'
        '{"messages": [{"role": "user", "content": "hi"}], "output_len": 3}\n'
    )
    w = load_workload(good)
    assert [r.max_new_tokens for r in w.requests] == [4, 3] and w.name == "w"
    p = profile_checkpoint(skewed, w, tokens=20)
    assert p.workloads == ("w",) and p.layers[0].decode_tokens > 0
    bad = tmp_path / "bad.jsonl"
    for text, message in (
        ('{"prompt": "x"}\n{"prompt": 3}\n', r"bad.jsonl:2: needs a non-empty string 'prompt'"),
        ('{"prompt": "x", "max_tokens": -1}\n', "non-negative integer"),
        ("[1, 2]\n", "JSON object"),
        ('{"prompt": "x"\n', "bad.jsonl:1: not valid JSON"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_workload(bad)
    with pytest.raises(ConfigError, match="unknown workload 'nope'"):
        load_workload("nope")
