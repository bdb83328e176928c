"""``kvcast train-policy``: train the `learned` policy in the Gymnasium environment (plain PyTorch, CPU).

Two phases, both in `kvcast.streamer.gym.KvcastEnv` sessions drawn from the training traces:

1. **Imitation** of a teacher (`hybrid` by default: the strongest controller that needs no future knowledge and
   whose every decision is an action of the environment: text at the front, a level at the back, or wait).
   The teacher plays `demo_episodes` sessions; its answers, mapped to actions, are the labels of a masked
   softmax over the network's scores of the action rows (cross-entropy, Adam, `bc_epochs` epochs). A random
   start on this problem spends most of its budget learning what a planner already knows; imitation gets
   there in a few minutes.
2. **Fine-tuning on the reward** (`kvcast.streamer.gym.RewardWeights`) with REINFORCE and a greedy
   ("self-critical") baseline: each update draws `batch` sessions; on each, the greedy policy plays once and
   the sampling policy `samples` times, and ``(return - greedy return) * sum log pi`` is the gradient signal.
   The same session for both removes the session's own difficulty from the variance, which is most of it (a
   trace with a bandwidth dip misses whatever the policy does). Every `eval_every` updates the greedy policy
   is scored on fixed validation sessions (of the training traces), and the best weights are kept.

Reproducible for a seed: every session and sample comes from generators seeded by `TrainSettings.seed`, and the
budget is counted in episodes and updates, not seconds (`minutes` is only a cap that stops fine-tuning early;
the result records whether it did, and then depends on the machine's speed). Torch runs on one thread.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvcast.streamer.config import SimulationConfig

__all__ = ["TrainSettings", "train_policy"]


@dataclass(frozen=True)
class TrainSettings:
    """Inputs of `train_policy` (the environment's other settings are `SimulationConfig`'s defaults)."""

    seed: int = 0
    teacher: str = "hybrid"
    """Policy spec imitated in phase 1 (empty: no imitation, start from random weights)."""
    demo_episodes: int = 6000
    """Sessions the teacher plays for the imitation data."""
    bc_epochs: int = 30
    """Passes over the imitation data."""
    updates: int = 600
    """REINFORCE updates of phase 2 (0: imitation only)."""
    batch: int = 16
    """Sessions per update."""
    samples: int = 2
    """Sampled episodes per session and update (besides the greedy one)."""
    lr: float = 1e-3
    """Adam's learning rate for imitation (fine-tuning uses a tenth of it)."""
    entropy: float = 0.003
    """Entropy bonus of fine-tuning."""
    hidden: int = 32
    """Hidden units per layer (two tanh layers)."""
    eval_every: int = 100
    """Updates between validations."""
    eval_sessions: int = 300
    """Validation sessions (fixed, from the training traces)."""
    minutes: float = 0.0
    """Wall-clock cap of fine-tuning (0: none); see the module docstring on reproducibility."""
    slo_s: float = SimulationConfig.slo_s
    levels: tuple[str, ...] | None = None
    """Menu levels of the training sessions (None: all, as `kvcast simulate`)."""
    reward: dict[str, float] = field(default_factory=dict)
    """Overrides of `RewardWeights` fields (miss, overrun, quality, invalid)."""

    def __post_init__(self) -> None:
        for name in ("demo_episodes", "bc_epochs", "updates", "eval_sessions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batch < 1 or self.samples < 1 or self.hidden < 1 or self.eval_every < 1:
            raise ValueError("batch, samples, hidden and eval_every must be >= 1")
        if not self.teacher and self.updates == 0:
            raise ValueError("nothing to train: no teacher and no updates")


def _softmax_pick(scores: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None) -> int:
    masked = np.where(mask, scores, -np.inf)
    if rng is None:
        return int(masked.argmax())
    p = np.exp(masked - masked.max())
    p /= p.sum()
    return int(np.searchsorted(np.cumsum(p), rng.random() * (1.0 - 1e-12)))


class _Net:
    """The MLP in torch (training) and its NumPy twin (fast rollouts)."""

    def __init__(self, n_features: int, hidden: int, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.module = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1))
        self.mean = np.zeros(n_features)
        self.std = np.ones(n_features)
        self.sync()

    def set_normalisation(self, rows: np.ndarray) -> None:
        flat = rows.reshape(-1, rows.shape[-1])
        self.mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        self.std = np.where(std > 1e-6, std, 1.0)

    def sync(self) -> None:
        """Copy torch's parameters into the NumPy forward."""
        layers = [m for m in self.module if hasattr(m, "weight")]
        self.np = [(layer.weight.detach().numpy().T.astype(np.float64), layer.bias.detach().numpy().astype(np.float64))
                   for layer in layers]

    def scores_np(self, rows: np.ndarray) -> np.ndarray:
        (w1, b1), (w2, b2), (w3, b3) = self.np
        x = (rows - self.mean) / self.std
        h = np.tanh(x @ w1 + b1)
        h = np.tanh(h @ w2 + b2)
        return (h @ w3 + b3)[..., 0]

    def logits(self, rows: Any, mask: Any) -> Any:
        torch = self.torch
        x = (rows - torch.as_tensor(self.mean, dtype=torch.float32)) / torch.as_tensor(self.std, dtype=torch.float32)
        s = self.module(x)[..., 0]
        return s.masked_fill(~mask, -1e9)

    def tensors(self) -> dict[str, np.ndarray]:
        (w1, b1), (w2, b2), (w3, b3) = self.np
        return {"mean": self.mean, "std": self.std, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3[:, 0],
                "b3": b3}


def _teacher_action(env: Any, obs: Any, decision: Any) -> int:
    """The environment action closest to a teacher's decision."""
    from kvcast.policies.base import TEXT

    actions = env.actions
    if decision is None:
        return actions.wait
    if decision.action == TEXT:
        return actions.text
    return actions.levels.index(decision.action)


def _episode(env: Any, seed: int, pick: Callable[[np.ndarray, np.ndarray, dict[str, Any]], int],
             record: list[tuple[np.ndarray, np.ndarray, int]] | None = None) -> tuple[float, dict[str, Any]]:
    """Play one session; returns the return and the session's result summary."""
    obs, info = env.reset(seed=seed)
    total = 0.0
    width = env.actions.size
    while True:
        rows = obs.reshape(width, -1)
        mask = info["action_mask"]
        action = pick(rows, mask, info)
        if record is not None:
            record.append((rows, mask, action))
        obs, reward, terminated, _, info = env.step(action)
        total += reward
        if terminated:
            return total, info["result"]


def train_policy(traces: Sequence[Any], settings: TrainSettings, out: str | Path,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, write the weights to `out` (safetensors) and return a JSON-ready report."""
    import torch

    from kvcast.policies.features import FEATURES
    from kvcast.policies.learned import save_weights
    from kvcast.policies.registry import default_registry
    from kvcast.streamer.gym import KvcastEnv, RewardWeights

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    config = SimulationConfig(slo_s=settings.slo_s, levels=settings.levels, seed=settings.seed)
    weights = RewardWeights(**settings.reward)
    env = KvcastEnv(traces, config, weights)
    root = np.random.SeedSequence(settings.seed)
    demo_seeds, val_seeds, rl_seeds = (np.random.default_rng(s) for s in root.spawn(3))
    net = _Net(len(FEATURES), settings.hidden, settings.seed)
    report: dict[str, Any] = {"settings": asdict(settings), "reward": asdict(weights), "traces": len(env.traces),
                              "levels": list(env.actions.levels)}
    validation = [int(s) for s in val_seeds.integers(0, 2**31 - 1, settings.eval_sessions)]

    def validate() -> dict[str, float]:
        returns, missed, loss = [], 0, 0.0
        for seed in validation:
            ret, result = _episode(env, seed, lambda rows, mask, _: _softmax_pick(net.scores_np(rows), mask, None))
            returns.append(ret)
            missed += not result["slo_met"]
            loss += result["quality_loss"]
        n = max(len(validation), 1)
        return {"return": float(np.mean(returns)) if returns else 0.0, "violations": missed / n,
                "quality_loss": loss / n}

    # ---------------------------------------------------------------- phase 1: imitation
    if settings.teacher:
        registry = default_registry()
        record: list[tuple[np.ndarray, np.ndarray, int]] = []
        t0 = time.perf_counter()
        teacher_missed = 0
        for seed in demo_seeds.integers(0, 2**31 - 1, settings.demo_episodes):
            teacher = registry.create(settings.teacher)
            state = {"reset": False}

            def pick(rows: np.ndarray, mask: np.ndarray, info: dict[str, Any], teacher=teacher, state=state) -> int:
                obs = info["observation"]
                if not state["reset"]:
                    teacher.reset(obs.session)
                    state["reset"] = True
                return _teacher_action(env, obs, teacher.decide(obs))

            _, result = _episode(env, int(seed), pick, record)
            teacher_missed += not result["slo_met"]
        rows = np.stack([r for r, _, _ in record]).astype(np.float32)
        masks = np.stack([m for _, m, _ in record])
        labels = np.array([a for _, _, a in record])
        invalid = int((~masks[np.arange(len(labels)), labels]).sum())
        masks[np.arange(len(labels)), labels] = True  # a label the mask refuses would be unlearnable
        net.set_normalisation(rows)
        teacher_rate = teacher_missed / max(settings.demo_episodes, 1)
        log(f"imitation data: {len(labels)} decisions of {settings.teacher!r} in {settings.demo_episodes} "
            f"sessions ({time.perf_counter() - t0:.0f} s; teacher violations {teacher_rate:.3f})")
        x, m, y = torch.as_tensor(rows), torch.as_tensor(masks), torch.as_tensor(labels)
        opt = torch.optim.Adam(net.module.parameters(), lr=settings.lr)
        gen = torch.Generator().manual_seed(settings.seed)
        t0 = time.perf_counter()
        for epoch in range(settings.bc_epochs):
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for i in range(0, len(y), 512):
                idx = order[i:i + 512]
                loss = torch.nn.functional.cross_entropy(net.logits(x[idx], m[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            if epoch == settings.bc_epochs - 1 or epoch % 10 == 0:
                with torch.no_grad():
                    acc = float((net.logits(x, m).argmax(-1) == y).float().mean())
                log(f"imitation epoch {epoch + 1}: loss {total / len(y):.4f}, agreement {acc:.3f}")
        net.sync()
        report["imitation"] = {"decisions": len(labels), "teacher_invalid": invalid,
                               "teacher_violations": teacher_missed / max(settings.demo_episodes, 1),
                               "agreement": acc, "seconds": time.perf_counter() - t0}
    else:
        probe: list[tuple[np.ndarray, np.ndarray, int]] = []
        rng = np.random.default_rng(settings.seed)
        for seed in range(50):
            _episode(env, seed, lambda rows, mask, _: int(rng.choice(np.flatnonzero(mask))), probe)
        net.set_normalisation(np.stack([r for r, _, _ in probe]))
        net.sync()

    # ---------------------------------------------------------------- phase 2: REINFORCE, greedy baseline
    best = validate()
    best_tensors = {k: v.copy() for k, v in net.tensors().items()}
    history = [{"update": 0, **best}]
    log(f"validation after imitation: return {best['return']:.4f}, violations {best['violations']:.3f}, "
        f"quality loss {best['quality_loss']:.4f}")
    opt = torch.optim.Adam(net.module.parameters(), lr=settings.lr / 10)
    rng = rl_seeds
    capped = False
    t0 = time.perf_counter()
    done = 0
    for update in range(1, settings.updates + 1):
        if settings.minutes and time.perf_counter() - t0 > settings.minutes * 60:
            capped = True
            break
        rows_all, masks_all, actions_all, advantages = [], [], [], []
        for seed in rng.integers(0, 2**31 - 1, settings.batch):
            seed = int(seed)
            greedy, _ = _episode(env, seed, lambda r, m, _: _softmax_pick(net.scores_np(r), m, None))
            for _ in range(settings.samples):
                record = []
                ret, _ = _episode(env, seed, lambda r, m, _: _softmax_pick(net.scores_np(r), m, rng), record)
                adv = ret - greedy
                for r, m, a in record:
                    rows_all.append(r)
                    masks_all.append(m)
                    actions_all.append(a)
                    advantages.append(adv)
        x = torch.as_tensor(np.stack(rows_all).astype(np.float32))
        m = torch.as_tensor(np.stack(masks_all))
        a = torch.as_tensor(np.array(actions_all))
        adv = torch.as_tensor(np.array(advantages, dtype=np.float32))
        logp = torch.log_softmax(net.logits(x, m), dim=-1)
        chosen = logp.gather(1, a[:, None])[:, 0]
        entropy = -(logp.exp() * logp.masked_fill(~m, 0.0)).sum(-1)
        loss = -(adv * chosen).sum() / (settings.batch * settings.samples) - settings.entropy * entropy.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.module.parameters(), 1.0)
        opt.step()
        net.sync()
        done = update
        if update % settings.eval_every == 0 or update == settings.updates:
            score = validate()
            history.append({"update": update, **score})
            improved = score["return"] > best["return"]
            if improved:
                best = score
                best_tensors = {k: v.copy() for k, v in net.tensors().items()}
            log(f"update {update}: validation return {score['return']:.4f}, violations {score['violations']:.3f}, "
                f"quality loss {score['quality_loss']:.4f}{' (best)' if improved else ''}; "
                f"{time.perf_counter() - t0:.0f} s")
    report["fine_tuning"] = {"updates": done, "capped_by_minutes": capped, "seconds": time.perf_counter() - t0,
                             "history": history}
    report["best_validation"] = best
    report["wall_s"] = time.perf_counter() - t_start
    metadata = {"trainer": "kvcast train-policy", "seed": str(settings.seed), "teacher": settings.teacher,
                "reward": json.dumps(asdict(weights)), "traces": str(len(env.traces)),
                "updates": str(done), "validation": json.dumps(best)}
    save_weights(out, best_tensors, metadata)
    env.close()
    report["out"] = str(out)
    report["bytes"] = Path(out).stat().st_size
    if not math.isfinite(best["return"]):
        raise RuntimeError("training diverged")
    return report
