"""`fixed:<level>`: load every chunk at one codec level, in chunk order, one transfer at a time."""

from __future__ import annotations

from kvcast.policies.base import Decision, Observation, Policy, Session, level_names


class FixedLevelPolicy(Policy):
    """Always the same level (``fixed:cachegen-2``); never recomputes. A baseline, not a controller."""

    name = "fixed"

    def __init__(self, level: str | None = None) -> None:
        if not level:
            raise ValueError("policy 'fixed' needs a level: fixed:<level>, e.g. fixed:cachegen-2")
        self.level = level

    def reset(self, session: Session) -> None:
        super().reset(session)
        for menu in session.menus:
            try:
                menu.option(self.level)
            except KeyError as exc:
                raise ValueError(f"policy {self.name}:{self.level}: {exc.args[0]}") from None
        self.levels = level_names(session.menus)

    def decide(self, obs: Observation) -> Decision | None:
        if not obs.link_idle:
            return None
        return Decision(obs.pending[0], self.level)
