"""The simple policies: fixed:<level>, raw, text, cachegen (published) and cachegen-code (artifact)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcast.netsim import SimPyLink, VirtualTimeLoop
from kvcast.policies.base import TEXT, ChunkMenu, LevelOption, Observation, Policy, Session, ThroughputSample
from kvcast.policies.cachegen import CacheGenPolicy
from kvcast.policies.cachegen_code import CacheGenCodePolicy
from kvcast.policies.registry import PolicyPluginError, PolicyRegistry, UnknownPolicyError, default_registry
from kvcast.policies.text import TextPolicy
from kvcast.streamer.engine import StreamingEngine
from kvcast.streamer.menus import ModelShape, build_menus, recompute_cost
from kvcast.streamer.profile import default_profile
from kvcast.traces.trace import Trace

LEVELS = (("hi", 4_000_000, 0.0), ("mid", 2_000_000, 0.01), ("lo", 1_000_000, 0.05))  # name, bytes, loss


def toy_menus(n: int, decode_s: float = 0.0) -> tuple[ChunkMenu, ...]:
    options = tuple(LevelOption(name, b, decode_s, q) for name, b, q in LEVELS)
    return tuple(ChunkMenu(i, 100 * i, 100, options, 0.2) for i in range(n))


def observe(session: Session, *, now: float, pending, samples=(), link_idle=True) -> Observation:
    n = len(session.menus)
    return Observation(now_s=now, session=session, pending=tuple(pending),
                       actions=tuple(None if i in pending else "mid" for i in range(n)),
                       ready=tuple(False for _ in range(n)), link_idle=link_idle, compute_idle=True,
                       link_busy_until_s=now, decoder_free_at_s=now, compute_free_at_s=now,
                       samples=tuple(samples))


def sample(nbytes: int, seconds: float) -> ThroughputSample:
    return ThroughputSample(0, nbytes, 0.0, seconds)


def test_registry_has_the_simple_policies():
    reg = default_registry()
    for spec in ("fixed:int8", "raw", "text", "cachegen", "cachegen:3", "cachegen-code"):
        assert reg.create(spec).name == spec.split(":")[0]
    with pytest.raises(ValueError, match="needs a level"):
        reg.create("fixed")


def test_builtin_policies_are_imported_only_when_created():
    """`names()` lists every built-in without importing it; creating `text` imports no planning policy."""
    code = (
        "import json, sys\n"
        "from kvcast.policies.registry import BUILTIN_POLICIES, default_registry\n"
        "reg = default_registry()\n"
        "names = reg.names()\n"
        "before = sorted(m for m in sys.modules if m.startswith('kvcast.policies'))\n"
        "policy = reg.create('text')\n"
        "after = sorted(m for m in sys.modules if m.startswith('kvcast.policies'))\n"
        "print(json.dumps({'names': names, 'builtin': sorted(BUILTIN_POLICIES), 'before': before,\n"
        "                  'after': after, 'policy': type(policy).__name__}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    assert set(data["builtin"]) == {"fixed", "raw", "text", "cachegen", "cachegen-code", "mpc", "hybrid",
                                    "oracle", "learned", "cake", "cake-cachegen", "rate", "slack"}
    assert set(data["builtin"]) <= set(data["names"])
    assert data["policy"] == "TextPolicy"
    for module in ("text", "fixed", "cachegen", "mpc", "hybrid", "oracle", "planning", "learned"):
        assert f"kvcast.policies.{module}" not in data["before"], module
    assert "kvcast.policies.text" in data["after"]
    for module in ("kvcast.policies.mpc", "kvcast.policies.oracle", "kvcast.policies.hybrid",
                   "kvcast.policies.planning"):
        assert module not in data["after"], module


def test_registry_resolves_paths_lazily_and_keeps_unknown_policy_errors():
    reg = PolicyRegistry()
    reg.register("t", "kvcast.policies.text:TextPolicy")
    reg.register("later", "kvcast.policies.no_such_module:Nothing")  # never created: never imported
    assert reg.names() == ["later", "t"]
    assert isinstance(reg.create("t"), TextPolicy) and reg.factory("t") is TextPolicy
    with pytest.raises(UnknownPolicyError, match="unknown policy 'nope'; known: later, t") as info:
        reg.create("nope")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ModuleNotFoundError):
        reg.create("later")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("t", TextPolicy)
    reg.register("bad", lambda: "not a policy")
    with pytest.raises(TypeError, match="not a Policy"):
        reg.create("bad")


def install_fake_plugin(site, package: str, entry_points: dict[str, str]) -> None:
    """Write a distribution's metadata into `site` (on sys.path): `package` with `entry_points` in the
    kvcast.policies group, as pip would install them (no code: the entry points name existing modules)."""
    info = site / f"{package.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kvcast.policies]\n{lines}")


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """An empty site folder first on sys.path: `install_fake_plugin` puts packages into it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_points_are_registered_unloaded_and_loaded_on_create(plugin_site):
    install_fake_plugin(plugin_site, "third-party", {"third": "kvcast.policies.text:TextPolicy"})
    reg = default_registry()
    assert "third" in reg.names()
    assert reg.origin("third") == ("package 'third-party' (entry point third = 'kvcast.policies.text:TextPolicy' "
                                   "in group 'kvcast.policies')")
    assert reg.origin("mpc") == "kvcast"
    assert isinstance(reg.create("third"), TextPolicy)
    assert "package 'third-party'" in reg.origin("third")  # still named after loading
    reg.load_entry_points()  # again: the same entry point is no second claim
    assert isinstance(reg.create("third"), TextPolicy)


def test_a_broken_plugin_names_its_package_and_spares_the_others(plugin_site):
    install_fake_plugin(plugin_site, "broken-pkg", {"broken": "kvcast_no_such_module:Policy",
                                                    "missing": "kvcast.policies.text:NoSuchClass",
                                                    "constant": "kvcast.policies.registry:ENTRY_POINT_GROUP"})
    reg = default_registry()  # nothing is imported yet: no error
    assert {"broken", "missing", "constant"} <= set(reg.names())
    with pytest.raises(PolicyPluginError, match=r"policy 'broken' from package 'broken-pkg' \(entry point broken = "
                       r"'kvcast_no_such_module:Policy' .*\) does not load: ModuleNotFoundError") as info:
        reg.create("broken")
    assert isinstance(info.value.__cause__, ModuleNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(PolicyPluginError, match="'missing' from package 'broken-pkg'.*AttributeError"):
        reg.create("missing")
    with pytest.raises(PolicyPluginError, match="'constant' from package 'broken-pkg'.* names str 'kvcast.policies'"):
        reg.create("constant")
    assert isinstance(reg.create("text"), TextPolicy)


def test_a_name_claimed_twice_is_an_error_when_used(plugin_site):
    install_fake_plugin(plugin_site, "shadow-pkg", {"mpc": "kvcast.policies.text:TextPolicy",
                                                    "twice": "kvcast.policies.text:TextPolicy"})
    install_fake_plugin(plugin_site, "other-pkg", {"twice": "kvcast.policies.raw:RawPolicy"})
    reg = default_registry()
    assert reg.names().count("mpc") == 1 and "twice" in reg.names()
    with pytest.raises(PolicyPluginError, match=r"policy name 'mpc' is claimed 2 times: by kvcast and by package "
                       r"'shadow-pkg' .*; rename the plug-in's entry point"):
        reg.create("mpc")  # never silently kvcast's mpc, nor the plug-in's
    with pytest.raises(PolicyPluginError, match="'twice' is claimed 2 times: by package '(shadow|other)-pkg'.* and "
                       "by package '(shadow|other)-pkg'") as info:
        reg.create("twice")
    assert "shadow-pkg" in str(info.value) and "other-pkg" in str(info.value)
    assert isinstance(reg.create("hybrid"), Policy)


def test_an_entry_point_that_cannot_be_named_is_left_out_and_reported(plugin_site):
    install_fake_plugin(plugin_site, "colon-pkg", {"a:b": "kvcast.policies.text:TextPolicy"})
    reg = default_registry()
    assert "a:b" not in reg.names() and "a" not in reg.names()
    with pytest.raises(UnknownPolicyError, match="unknown policy 'a'; known: .*; ignored for its name: package "
                       "'colon-pkg' \\(entry point a:b = "):
        reg.create("a:b")


def test_the_simulate_command_names_a_broken_plugin(plugin_site, tmp_path):
    from typer.testing import CliRunner

    from kvcast.cli import app

    install_fake_plugin(plugin_site, "broken-pkg", {"broken": "kvcast_no_such_module:Policy"})
    result = CliRunner().invoke(app, ["simulate", "--policies", "text,broken", "--out", str(tmp_path / "out")],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "policy 'broken' from package 'broken-pkg'" in result.output
    assert "No module named 'kvcast_no_such_module'" in result.output


@pytest.mark.parametrize("tput_bps, expected", [
    (8e6 * 3 / 1.0 * 4 / 1.0, "hi"),    # 3 chunks x 4 MB in 1 s needs 96 Mbps
    (50e6, "mid"),                       # 3 x 2 MB = 48 Mbit -> 0.96 s fits, hi (1.92 s) does not
    (30e6, "lo"),                        # 3 x 1 MB = 24 Mbit -> 0.8 s
    (10e6, TEXT),                        # even lo needs 2.4 s
])
def test_cachegen_picks_the_highest_level_that_fits_else_text(tput_bps, expected):
    policy = CacheGenPolicy()
    session = Session(toy_menus(3), slo_s=1.0, prior_throughput_bps=tput_bps)
    policy.reset(session)
    decision = policy.decide(observe(session, now=0.0, pending=(0, 1, 2)))
    assert decision.chunk == 0 and decision.action == expected
    assert decision.predicted_bps == tput_bps


def test_cachegen_uses_the_previous_chunk_and_the_remaining_slo():
    policy = CacheGenPolicy()
    session = Session(toy_menus(3), slo_s=2.0, rtt_s=0.0, prior_throughput_bps=1e9)
    policy.reset(session)
    # previous chunk: 2 MB in 0.5 s = 32 Mbps; 1.5 s left for 2 chunks: mid needs 1.0 s, hi 2.0 s
    obs = observe(session, now=0.5, pending=(1, 2), samples=[sample(2_000_000, 0.5)])
    assert policy.decide(obs).action == "mid"
    # the same throughput with only 0.6 s left: lo (0.5 s) fits, mid does not
    obs = observe(session, now=1.4, pending=(1, 2), samples=[sample(2_000_000, 0.5)])
    assert policy.decide(obs).action == "lo"
    assert policy.decide(observe(session, now=1.4, pending=(1, 2), link_idle=False)) is None


def test_cachegen_window_takes_the_harmonic_mean():
    policy = CacheGenPolicy(window=2)
    session = Session(toy_menus(2), slo_s=1.0)
    policy.reset(session)
    obs = observe(session, now=0.0, pending=(1,), samples=[sample(1_000_000, 1.0), sample(1_000_000, 0.25)])
    assert policy.estimate_bps(obs) == pytest.approx(2 / (1 / 8e6 + 1 / 32e6))


@settings(max_examples=80, deadline=None)
@given(tput=st.floats(1e6, 1e9), remaining=st.floats(0.01, 5.0), first=st.integers(0, 4),
       rtt=st.floats(0.0, 0.05))
def test_cachegen_choice_is_the_best_level_whose_prediction_fits(tput, remaining, first, rtt):
    menus = toy_menus(5)
    session = Session(menus, slo_s=10.0, rtt_s=rtt, prior_throughput_bps=tput)
    policy = CacheGenPolicy()
    policy.reset(session)
    pending = tuple(range(first, 5))
    decision = policy.decide(observe(session, now=10.0 - remaining, pending=pending))

    def fits(k):
        return sum(rtt + menus[j].levels[k].nbytes * 8 / tput for j in pending) <= remaining

    fitting = [k for k in range(len(LEVELS)) if fits(k)]
    assert decision.action == (LEVELS[fitting[0]][0] if fitting else TEXT)


def run_session(policy, menus, trace, slo_s, prior, rtt_s=0.0):
    loop = VirtualTimeLoop()
    link = SimPyLink(loop.env, trace, rtt_s=rtt_s)
    try:
        return loop.run_until_complete(
            StreamingEngine(policy, menus, link, slo_s=slo_s, prior_throughput_bps=prior).run())
    finally:
        loop.close()


@settings(max_examples=30, deadline=None)
@given(bandwidth=st.floats(5e6, 2e8), slo=st.floats(0.2, 4.0), rtt=st.floats(0.0, 0.02), n=st.integers(1, 6))
def test_cachegen_meets_the_slo_on_constant_bandwidth_when_it_loads_everything(bandwidth, slo, rtt, n):
    """With a constant link and an exact prior the prediction is exact: if cachegen never falls back to
    text, it meets the SLO."""
    trace = Trace([0.0, 100.0], [bandwidth])
    result = run_session(CacheGenPolicy(), toy_menus(n), trace, slo, bandwidth, rtt)
    if result.text_chunks == 0:
        assert result.ttft_s <= slo * (1 + 1e-9)


def test_cachegen_falls_back_to_text_when_nothing_fits():
    result = run_session(CacheGenPolicy(), toy_menus(3), Trace([0.0, 100.0], [1e6]), 0.5, 1e6)
    assert [c.action for c in result.chunks] == [TEXT] * 3
    assert result.bytes_loaded == 0


def test_cachegen_code_uses_the_oracle_bandwidth_and_a_static_budget():
    # 3 chunks, SLO 1.5 s: 0.5 s per chunk whatever happened before. Bandwidth 40 Mbps then 10 Mbps.
    trace = Trace([0.0, 0.3, 100.0], [40e6, 10e6])
    policy = CacheGenCodePolicy()
    result = run_session(policy, toy_menus(3), trace, 1.5, None)
    # t=0: 40 Mbps -> hi is 0.8 s, mid 0.4 s < 0.5: mid. Later 10 Mbps: lo takes 0.8 s > 0.5: text.
    assert result.chunks[0].action == "mid"
    assert [c.action for c in result.chunks[1:]] == [TEXT, TEXT]
    assert result.chunks[0].predicted_bps == 40e6
    assert policy.budget_s == pytest.approx(0.5)


def test_cachegen_code_level_restriction_and_errors():
    policy = CacheGenCodePolicy("mid+lo")
    session = Session(toy_menus(2), slo_s=100.0, future_bandwidth_bps=lambda t: 1e12)
    policy.reset(session)
    assert policy.decide(observe(session, now=0.0, pending=(0, 1))).action == "mid"
    with pytest.raises(ValueError, match="not on the menu"):
        CacheGenCodePolicy("zz").reset(session)
    with pytest.raises(ValueError, match="simulated link"):
        CacheGenCodePolicy().reset(Session(toy_menus(2), slo_s=1.0))


def test_fixed_raw_and_text_on_real_menus():
    menus = build_menus(default_profile(), ModelShape.named("mistral-7b"), 6000, 1536,
                        recompute_cost("h100/mistral-7b"))
    trace = Trace([0.0, 100.0], [5e9])
    reg = default_registry()
    raw = run_session(reg.create("raw"), menus, trace, 1.0, 5e9)
    profile = default_profile()
    assert {c.action for c in raw.chunks} == {"raw"}
    assert raw.quality_loss == pytest.approx(profile.level("raw").quality_loss) and raw.quality_loss < 1e-6
    assert raw.bytes_loaded == 6000 * ModelShape.named("mistral-7b").raw_bytes_per_token
    fixed = run_session(reg.create("fixed:cachegen-2"), menus, trace, 1.0, 5e9)
    assert {c.action for c in fixed.chunks} == {"cachegen-2"}
    weighted = sum(m.option("cachegen-2").quality_loss * m.tokens for m in menus) / 6000
    assert fixed.quality_loss == pytest.approx(weighted)  # each chunk's loss at its distance from the end
    text = run_session(reg.create("text"), menus, trace, 1.0, 5e9)
    assert {c.action for c in text.chunks} == {TEXT} and text.bytes_loaded == 0
    assert text.ttft_s == pytest.approx(sum(m.recompute_s for m in menus))
    with pytest.raises(ValueError, match="no level 'zz'"):
        run_session(reg.create("fixed:zz"), menus, trace, 1.0, 5e9)


def test_cachegen_code_charges_the_rtt_the_engine_charges_unless_asked_for_the_artifacts_rule():
    # budget 1.5 s / 3 chunks = 0.5 s; at 40 Mbps mid's transfer is 0.4 s: it fits without the 0.15 s RTT
    # (the artifact's rule) and not with it (0.55 s), where lo (0.2 + 0.15 s) does
    trace = Trace([0.0, 100.0], [40e6])
    fair = run_session(CacheGenCodePolicy(), toy_menus(3), trace, 1.5, None, rtt_s=0.15)
    artifact = run_session(CacheGenCodePolicy("rtt=off"), toy_menus(3), trace, 1.5, None, rtt_s=0.15)
    assert [c.action for c in fair.chunks] == ["lo"] * 3
    assert [c.action for c in artifact.chunks] == ["mid"] * 3
    assert fair.slo_met and not artifact.slo_met  # 3 x (0.15 + 0.4) = 1.65 s > 1.5 s
    assert CacheGenCodePolicy("mid+lo+rtt=off").only == ("mid", "lo")
    assert default_registry().create("cachegen-code:rtt=off").charge_rtt is False
    with pytest.raises(ValueError, match="unknown option"):
        CacheGenCodePolicy("rtt=maybe")


@pytest.mark.parametrize("spec", ["cachegen", "cachegen-code", "cachegen-code:rtt=off"])
def test_cachegen_controllers_never_try_raw(spec):
    """CacheGen's code tries levels 3 -> 2 -> 1 only: on a fast link with raw on the menu, the best level it
    loads is cachegen-3, not the uncompressed KV."""
    from kvcast.policies.cachegen import CACHEGEN_LEVELS, cachegen_levels

    menus = build_menus(default_profile(), ModelShape.named("mistral-7b"), 6000, 1536,
                        recompute_cost("h100/mistral-7b"))
    assert "raw" in [o.level for o in menus[0].levels]
    assert cachegen_levels(menus) == ("cachegen-3", "cachegen-2", "cachegen-1") == CACHEGEN_LEVELS
    result = run_session(default_registry().create(spec), menus, Trace([0.0, 100.0], [1e12]), 10.0, 1e12)
    assert {c.action for c in result.chunks} == {"cachegen-3"}
