"""The Gymnasium environment (`kvcast.streamer.gym`): Gymnasium's checker, determinism, exact agreement with
`simulate_session`, the reward's definition, invalid actions, vectorised envs, the benchmark and the trainer's
reproducibility."""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from kvcast.policies.base import TEXT
from kvcast.policies.hybrid import HybridPolicy
from kvcast.streamer.config import SimulationConfig
from kvcast.streamer.gym import KvcastEnv, RewardWeights
from kvcast.streamer.simulate import simulate_session

SMALL = SimulationConfig(context_tokens=(6000, 9000))


def play(env, seed, choose):
    """One episode; `choose(info)` picks each action. Returns (observations, actions, rewards, last info)."""
    obs, info = env.reset(seed=seed)
    seen, actions, rewards = [obs], [], []
    while True:
        action = choose(info)
        obs, reward, terminated, truncated, info = env.step(action)
        assert not truncated
        seen.append(obs)
        actions.append(action)
        rewards.append(reward)
        if terminated:
            return seen, actions, rewards, info


def random_valid(seed):
    rng = np.random.default_rng(seed)
    return lambda info: int(rng.choice(np.flatnonzero(info["action_mask"])))


def mirror(policy):
    """An agent that answers what `policy` answers, as actions (hybrid's decisions map exactly)."""
    state = {}

    def choose(info):
        obs = info["observation"]
        if state.get("session") is not obs.session:
            policy.reset(obs.session)
            state["session"] = obs.session
        decision = policy.decide(obs)
        levels = info["levels"]
        if decision is None:
            return len(levels) + 1
        if decision.action == TEXT:
            assert decision.chunk == obs.pending[0]
            return len(levels)
        assert decision.chunk == obs.pending[-1]
        return levels.index(decision.action)
    return choose


def test_env_passes_gymnasiums_checker():
    env = KvcastEnv(config=SMALL)
    check_env(env, skip_render_check=True)
    env.close()


def test_a_seed_fixes_the_session_and_the_episode():
    a, b = KvcastEnv(config=SMALL), KvcastEnv(config=SMALL)
    obs_a, actions, rewards_a, info_a = play(a, 7, random_valid(1))
    replay = iter(actions)
    obs_b, _, rewards_b, info_b = play(b, 7, lambda info: next(replay))
    assert info_a["session"] == info_b["session"] and info_a["result"] == info_b["result"]
    assert rewards_a == rewards_b
    assert all(np.array_equal(x, y) for x, y in zip(obs_a, obs_b, strict=True))
    sessions = {json.dumps(play(a, s, random_valid(s))[3]["session"], sort_keys=True) for s in range(5)}
    assert len(sessions) == 5  # other seeds, other sessions
    a.close()
    b.close()


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_an_agent_mirroring_hybrid_reproduces_simulate_session_exactly(seed):
    """The environment drives the real engine: the same answers give the same session, chunk for chunk."""
    env = KvcastEnv()
    _, _, rewards, info = play(env, seed, mirror(HybridPolicy()))
    s = info["session"]
    trace = env._scaled[s["trace"]]
    menus = env._menus_for(s["context_tokens"])
    c = env.config
    direct = simulate_session(HybridPolicy(), menus, trace, slo_s=c.slo_s, offset_s=s["offset_s"], rtt_s=c.rtt_s,
                              efficiency=c.efficiency, overhead_bytes=c.overhead_bytes,
                              prior_throughput_bps=s["prior_bps"], label="gym")
    expected = direct.summary()
    got = info["result"]
    for key in ("ttft_s", "quality_loss", "bytes_loaded", "text_chunks", "slo_met"):
        assert got[key] == expected[key], key
    w = env.reward_weights
    assert sum(rewards) == pytest.approx(-(w.miss * (not direct.slo_met) + w.overrun * direct.overrun_s
                                           + w.quality * direct.quality_loss))
    env.close()


def test_shared_menus_equal_build_menus():
    env = KvcastEnv()
    for tokens in (12288, 12289, 13000, 15360, 20480):
        assert env._menus_for(tokens) == env._build(tokens)
    env.close()


@pytest.mark.parametrize("shaped", [True, False])
def test_the_return_is_the_documented_reward(shaped):
    weights = RewardWeights(miss=1.0, overrun=3.0, quality=7.0, shaped=shaped)
    env = KvcastEnv(config=SMALL, reward=weights)
    for seed in range(4):
        _, _, rewards, info = play(env, seed, random_valid(seed))
        r = info["result"]
        assert sum(rewards) == pytest.approx(-(1.0 * (not r["slo_met"]) + 3.0 * r["overrun_s"]
                                               + 7.0 * r["quality_loss"]), abs=1e-12)
        if not shaped:
            assert all(x == 0.0 for x in rewards[:-1])
    env.close()


def test_invalid_actions_become_text_and_are_flagged():
    env = KvcastEnv(config=SMALL, reward=RewardWeights(invalid=0.25))
    obs, info = env.reset(seed=2)
    mask = info["action_mask"]
    assert mask[env.actions.text] and not mask[env.actions.wait]  # nothing in flight yet: no waiting
    pending = info["observation"].pending
    _, reward, _, _, info = env.step(env.actions.wait)
    assert info["invalid_action"] and reward == -0.25
    assert info["observation"].actions[pending[0]] == TEXT
    _, _, _, _, info = env.step(env.actions.size + 5)  # out of range: text too
    assert info["invalid_action"]
    with pytest.raises(RuntimeError, match="before reset"):
        KvcastEnv(config=SMALL).step(0)
    env.close()


def test_reset_options_fix_the_session():
    env = KvcastEnv(config=SMALL)
    _, info = env.reset(options={"trace": 1, "context_tokens": 7000, "offset_s": 3.5})
    assert info["session"]["trace"] == 1 and info["session"]["context_tokens"] == 7000
    assert info["session"]["offset_s"] == 3.5
    env.close()


def test_sync_vector_env_steps_and_resets():
    envs = gymnasium.vector.SyncVectorEnv([lambda: KvcastEnv(config=SMALL) for _ in range(3)])
    obs, infos = envs.reset(seed=0)
    assert obs.shape == (3, *envs.single_observation_space.shape)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(60):
        actions = np.array([rng.choice(np.flatnonzero(m)) if m.any() else 0 for m in infos["action_mask"]])
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        ended += int(terminated.sum())
    assert ended >= 3
    envs.close()


def _make_small_env():
    return KvcastEnv(config=SMALL)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_async_vector_env_matches_sync_vector_env(context):
    """AsyncVectorEnv (workers made from pickled factories; ``spawn`` pickles them whole) plays the very episodes
    of SyncVectorEnv for the same seeds and actions, across episode ends (autoreset), in bounded time."""
    import multiprocessing

    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method here")
    factories = [_make_small_env, lambda: KvcastEnv(config=SMALL)]  # a module function and a lambda
    sync = gymnasium.vector.SyncVectorEnv(factories)
    parallel = gymnasium.vector.AsyncVectorEnv(factories, context=context)
    try:
        expected, infos = sync.reset(seed=[11, 12])
        parallel.reset_async(seed=[11, 12])
        got, got_infos = parallel.reset_wait(timeout=120)
        assert got.shape == expected.shape == (2, *parallel.single_observation_space.shape)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.array_equal(got_infos["action_mask"], infos["action_mask"])
        rng = np.random.default_rng(0)
        ended = np.zeros(2, dtype=int)
        for _ in range(40):
            actions = np.array([rng.choice(np.flatnonzero(m)) if m.any() else 0 for m in infos["action_mask"]])
            expected, rewards, terminated, truncated, infos = sync.step(actions)
            parallel.step_async(actions)
            got, got_rewards, got_terminated, got_truncated, got_infos = parallel.step_wait(timeout=60)
            assert got.shape == (2, *parallel.single_observation_space.shape) and rewards.shape == (2,)
            assert np.array_equal(got, expected) and np.array_equal(got_rewards, rewards)
            assert np.array_equal(got_terminated, terminated) and not got_truncated.any()
            assert np.array_equal(got_infos["action_mask"], infos["action_mask"])
            ended += terminated
        assert (ended >= 1).all()  # both envs finished an episode and went on with the next
    finally:
        parallel.close(terminate=True)
        sync.close()


def test_core_imports_without_gymnasium():
    """Blocking gymnasium: the core (simulate, the learned policy) imports; the env names the extra."""
    code = (
        "import sys\n"
        "sys.modules['gymnasium'] = None\n"
        "import kvcast.streamer.simulate, kvcast.policies.learned, kvcast.streamer.learn, kvcast.streamer.bench\n"
        "from kvcast.policies.registry import default_registry\n"
        "default_registry().create('learned')\n"
        "try:\n"
        "    import kvcast.streamer.gym\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "kvcast[gym]" in out


def test_bench_gym_reports_steps_per_second():
    from kvcast.streamer.bench import GymBenchSettings, bench_gym

    result = bench_gym(GymBenchSettings(steps=300, repeats=1, warmup=50, vector_envs=2))
    s = result["summary"]
    assert result["benchmark"] == "gym" and s["steps_per_s"] > 0 and s["steps_per_cpu_s"] > 0
    assert s["vector_steps_per_s"] > 0 and 3 < s["steps_per_episode"] < 40


def test_training_is_reproducible_for_a_seed(tmp_path):
    from kvcast.policies.learned import LearnedPolicy, load_weights
    from kvcast.streamer.learn import TrainSettings, train_policy
    from kvcast.traces.defaults import default_traces

    settings = TrainSettings(seed=3, demo_episodes=12, bc_epochs=2, updates=2, batch=2, eval_every=1,
                             eval_sessions=3)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    reports = [train_policy(default_traces()[:3], settings, p, log=lambda _: None) for p in paths]
    a, b = (load_weights(p) for p in paths)
    for name in ("w1", "b1", "w2", "b2", "w3", "b3", "mean", "std"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert reports[0]["best_validation"] == reports[1]["best_validation"]
    assert reports[0]["imitation"]["teacher_invalid"] == 0
    assert LearnedPolicy(str(paths[0])).weights.metadata["seed"] == "3"
