"""A fixed-size numeric view of an `Observation` and a discrete action space over it, shared by the Gymnasium
environment (`kvcast.streamer.gym`) and the `learned` policy (`kvcast.policies.learned`): one definition, so
a network trained in the environment sees in `kvcast simulate` exactly what it saw in training.

**Actions** (`ActionSpace`, for a menu whose levels are ``levels``, ``K = len(levels)``):

* ``0 .. K-1``: load the *last* pending chunk at ``levels[a]`` (the link loads from the back, as Cake does);
* ``K`` (`ActionSpace.text`): recompute the *first* pending chunk from text (compute goes from the front);
* ``K + 1`` (`ActionSpace.wait`): decide nothing now (the policy's ``None``); asked again at the next event.

With these moves the pending chunks are always one contiguous range, and every plan of `hybrid` (Cake's
text-front/load-back split with a level per loaded chunk) is reachable. An action is *valid* when a level is
on the last pending chunk's menu, always for text, and for wait only while the link or the compute unit is
busy (something in flight will end and ask again; waiting with both idle would stall the session).
`ActionSpace.mask` gives the valid ones; `ActionSpace.decision` maps an action to a `Decision` and
replaces an invalid one by text (always valid, lossless).

**Features** (`FeatureEncoder.encode`): one row per action, ``K + 2`` rows of `FEATURES` columns: the
`GLOBAL_FEATURES` (the same in every row) followed by the `OPTION_FEATURES` of that row's action. Times are
divided by the SLO (so one network serves any SLO and bandwidth scale); throughput is estimated as the
harmonic mean of the last `WINDOW` transfers with the RTT taken out (the session's prior before the first),
and every predicted time uses it. Every value is clipped to ``[-CLIP, CLIP]``. A network that scores each row
with the same weights (`kvcast.policies.learned`) therefore works on menus of any size and level names.

>>> from kvcast.policies.base import ChunkMenu, LevelOption, Observation, Session
>>> menus = tuple(ChunkMenu(i, 1024 * i, 1024, (LevelOption("a", 10**6, 0.001, 0.01),
...                                             LevelOption("b", 4 * 10**6, 0.001, 0.0)), 0.05)
...               for i in range(3))
>>> session = Session(menus, slo_s=0.5, rtt_s=0.01, prior_throughput_bps=1e9)
>>> obs = Observation(0.0, session, (0, 1, 2), (None,) * 3, (False,) * 3, True, True, 0.0, 0.0, 0.0)
>>> space = ActionSpace(("a", "b"))
>>> space.mask(obs).tolist()
[True, True, True, False]
>>> space.decision(obs, 0), space.decision(obs, space.text)
(Decision(chunk=2, action='a', predicted_bps=None), Decision(chunk=0, action='text', predicted_bps=None))
>>> encoder = FeatureEncoder(space)
>>> encoder.encode(obs).shape == (4, len(FEATURES))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kvcast.policies.base import TEXT, ChunkMenu, Decision, Observation, Session, level_names

__all__ = ["CLIP", "FEATURES", "GLOBAL_FEATURES", "OPTION_FEATURES", "WINDOW", "ActionSpace", "FeatureEncoder",
           "estimate_bps"]

WINDOW = 5
"""Transfers in the throughput estimate."""
CLIP = 10.0
"""Every feature is clipped to [-CLIP, CLIP]."""
QUALITY_SCALE = 10.0
"""Quality loss (KL per token) is multiplied by this (the profile's levels span 0 to ~0.2)."""

GLOBAL_FEATURES: tuple[str, ...] = (
    "remaining_over_slo",      # (SLO - now) / SLO; negative once missed
    "pending_share",           # pending chunks / chunks
    "link_idle",               # 0/1
    "compute_idle",            # 0/1
    "link_backlog_over_slo",   # (link_busy_until - now) / SLO: the engine's estimate of queued transfers
    "compute_backlog_over_slo",  # (compute_free_at - now) / SLO
    "decoder_backlog_over_slo",  # (decoder_free_at - now) / SLO
    "rtts_over_slo",           # RTT * pending chunks / SLO
    "all_text_slack",          # (SLO - now - compute backlog - recompute of every pending chunk) / SLO
    "has_samples",             # 0/1: a transfer has been measured in this session
    "log_last_over_estimate",  # log(last transfer's throughput / estimate): 0 before two samples
)
OPTION_FEATURES: tuple[str, ...] = (
    "valid",                   # 0/1: the action's mask
    "is_level",                # 0/1
    "is_text",                 # 0/1
    "is_wait",                 # 0/1
    "quality_loss",            # level: its quality loss on the chunk * QUALITY_SCALE; text, wait: 0
    "chunk_time_over_slo",     # level: (RTT + bits / estimate) / SLO; text: the chunk's recompute / SLO
    "decode_over_slo",         # level: decode_s / SLO; text, wait: 0
    "slack_all",               # level: (SLO - finish if every pending chunk loads at it) / SLO; text: all_text
    "slack_split",             # (SLO - finish of the best text-front/level-back split) / SLO; text: best level
    "split_text_share",        # text chunks in that best split / pending chunks
)
FEATURES: tuple[str, ...] = GLOBAL_FEATURES + OPTION_FEATURES
"""Column names of a row of `FeatureEncoder.encode`."""


def estimate_bps(obs: Observation, window: int = WINDOW) -> float | None:
    """Harmonic mean of the payload throughputs (RTT taken out) of the last `window` transfers; the
    session's prior before the first; None without either."""
    samples = obs.samples[-window:]
    if not samples:
        return obs.session.prior_throughput_bps
    rtt = obs.session.rtt_s
    inverse = 0.0
    for s in samples:
        duration = s.end_s - s.start_s
        busy = max(duration - rtt, 1e-3 * duration, 1e-12)
        inverse += busy / max(s.nbytes * 8.0, 1.0)
    return len(samples) / inverse


class ActionSpace:
    """The discrete actions over a menu of `levels` (see the module docstring)."""

    def __init__(self, levels: Sequence[str]) -> None:
        self.levels = tuple(levels)
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"an action space needs distinct level names, got {list(levels)}")
        self.text = len(self.levels)
        self.wait = self.text + 1
        self.size = self.wait + 1
        self._index = {name: k for k, name in enumerate(self.levels)}

    @classmethod
    def of_session(cls, session: Session) -> ActionSpace:
        """The action space of a session's menu (its first chunk's levels, in menu order)."""
        return cls(level_names(session.menus))

    def mask(self, obs: Observation) -> np.ndarray:
        """Valid actions in `obs` (bool, `size`)."""
        mask = np.zeros(self.size, dtype=bool)
        if not obs.pending:
            return mask
        menu = obs.session.menus[obs.pending[-1]]
        index = self._index
        for option in menu.levels:
            k = index.get(option.level)
            if k is not None:
                mask[k] = True
        mask[self.text] = True
        mask[self.wait] = not (obs.link_idle and obs.compute_idle)
        return mask

    def decision(self, obs: Observation, action: int, mask: np.ndarray | None = None) -> Decision | None:
        """The decision of `action` in `obs` (None for wait); an invalid action becomes text."""
        mask = self.mask(obs) if mask is None else mask
        if not 0 <= action < self.size or not mask[action]:
            action = self.text
        if action == self.wait:
            return None
        if action == self.text:
            return Decision(obs.pending[0], TEXT)
        return Decision(obs.pending[-1], self.levels[action])


class FeatureEncoder:
    """Turns observations of one session after another into ``(actions, FEATURES)`` arrays (float32).

    Per-session tables (bits, decode times, losses and availability by level and chunk, prefix sums) are
    built on the first observation of a session and kept while the session object stays the same; the
    columns of chunk menus already seen are reused (menus of equal chunks are often shared objects).
    """

    COLUMN_CACHE = 4096
    """Chunk menus whose table columns are kept."""

    def __init__(self, space: ActionSpace) -> None:
        self.space = space
        self._session: Session | None = None
        self._columns: dict[int, tuple[object, np.ndarray]] = {}
        g = len(GLOBAL_FEATURES)
        k = len(space.levels)
        template = np.zeros((space.size, len(FEATURES)), dtype=np.float32)
        template[:k, g + 1] = 1.0
        template[space.text, g + 2] = 1.0
        template[space.wait, g + 3] = 1.0
        self._template = template
        self._rows = np.arange(k)
        self._loads: dict[int, np.ndarray] = {}

    def _column(self, menu: ChunkMenu) -> np.ndarray:
        """``(4, K)``: bits, decode_s, quality loss, available, of one chunk by level."""
        cached = self._columns.get(id(menu))
        if cached is not None and cached[0] is menu:
            return cached[1]
        index = self.space._index
        col = np.zeros((4, len(self.space.levels)))
        col[0] = np.inf
        for option in menu.levels:
            j = index.get(option.level)
            if j is not None:
                col[:, j] = (option.nbytes * 8.0, option.decode_s, option.quality_loss, 1.0)
        if len(self._columns) >= self.COLUMN_CACHE:
            self._columns.clear()
        self._columns[id(menu)] = (menu, col)
        return col

    def _prepare(self, session: Session) -> None:
        menus = session.menus
        n, k = len(menus), len(self.space.levels)
        table = np.stack([self._column(m) for m in menus], axis=2)  # (4, K, n)
        bits = table[0]
        self._bits = bits
        self._bits_prefix = np.concatenate([np.zeros((k, 1)), np.cumsum(bits, axis=1)], axis=1)
        self._decode_slo = table[1] / session.slo_s
        self._loss = table[2] * QUALITY_SCALE
        self._avail = table[3] > 0.0
        recompute = [m.recompute_s for m in menus]
        self._recompute = recompute
        self._recompute_prefix = np.concatenate([[0.0], np.cumsum(recompute)])
        self._n = n
        self._missing = not bool(self._avail.all())  # a level absent on some chunk: sums become inf or nan
        self._session = session

    def mask(self, obs: Observation) -> np.ndarray:
        """`ActionSpace.mask` of `obs`, from this encoder's tables (faster)."""
        if obs.session is not self._session:
            self._prepare(obs.session)
        space = self.space
        mask = np.zeros(space.size, dtype=bool)
        if obs.pending:
            mask[:space.text] = self._avail[:, obs.pending[-1]]
            mask[space.text] = True
            mask[space.wait] = not (obs.link_idle and obs.compute_idle)
        return mask

    def encode(self, obs: Observation, mask: np.ndarray | None = None) -> np.ndarray:
        """The feature rows of `obs`: ``(space.size, len(FEATURES))`` float32 (see the module docstring)."""
        session = obs.session
        if session is not self._session:
            self._prepare(session)
        space = self.space
        if mask is None:
            mask = self.mask(obs)
        out = self._template.copy()
        pending = obs.pending
        if not pending:
            return out
        k = space.text
        g = len(GLOBAL_FEATURES)
        slo = session.slo_s
        now = obs.now_s
        rtt = session.rtt_s
        n_pending = len(pending)
        lo, hi = pending[0], pending[-1]
        contiguous = hi - lo + 1 == n_pending
        link_base = obs.link_busy_until_s - now
        link_base = link_base if link_base > 0.0 else 0.0
        compute_base = obs.compute_free_at_s - now
        compute_base = compute_base if compute_base > 0.0 else 0.0
        decoder_base = obs.decoder_free_at_s - now
        remaining = slo - now
        rec_prefix = self._recompute_prefix
        if contiguous:
            all_text = rec_prefix[hi + 1] - rec_prefix[lo]
        else:
            all_text = sum(self._recompute[c] for c in pending)
        all_text_slack = (remaining - compute_base - all_text) / slo
        est = estimate_bps(obs)
        samples = obs.samples
        log_last = 0.0
        if len(samples) >= 2 and est:
            s = samples[-1]
            busy = max(s.end_s - s.start_s - rtt, 1e-3 * (s.end_s - s.start_s), 1e-12)
            log_last = math.log(max(s.nbytes * 8.0 / busy, 1.0) / est)
        r = remaining / slo
        glob = (r, n_pending / self._n, float(obs.link_idle), float(obs.compute_idle), link_base / slo,
                compute_base / slo, (decoder_base if decoder_base > 0.0 else 0.0) / slo, rtt * n_pending / slo,
                all_text_slack, float(bool(samples)), log_last)
        out[:, :g] = [v if -CLIP <= v <= CLIP else (CLIP if v > 0 else -CLIP) for v in glob]
        out[:, g] = mask
        text = out[k]
        text[g + 5] = min(self._recompute[lo] / slo, CLIP)
        text[g + 7] = out[0, 8]  # all_text_slack, clipped
        valid_levels = mask[:k]
        if est and est > 0.0:
            if self._missing:
                with np.errstate(invalid="ignore"):  # inf - inf where a level is absent: nan, cleared below
                    self._levels(out, obs, mask, est, r, compute_base, link_base)
            else:
                self._levels(out, obs, mask, est, r, compute_base, link_base)
        else:
            out[:k, g + 4] = self._loss[:, hi] * valid_levels
            text[g + 8] = text[g + 7]
            text[g + 9] = 1.0
        if self._missing:
            np.nan_to_num(out, copy=False, nan=-CLIP, posinf=CLIP, neginf=-CLIP)
        return out

    def _levels(self, out: np.ndarray, obs: Observation, mask: np.ndarray, est: float, r: float,
                compute_base: float, link_base: float) -> None:
        """The level rows' time features and the text row's split features (a throughput estimate exists)."""
        space = self.space
        k = space.text
        g = len(GLOBAL_FEATURES)
        slo = obs.session.slo_s
        rtt = obs.session.rtt_s
        pending = obs.pending
        n_pending = len(pending)
        lo, hi = pending[0], pending[-1]
        contiguous = hi - lo + 1 == n_pending
        rec_prefix = self._recompute_prefix
        text = out[k]
        valid_levels = mask[:k]
        scale = 1.0 / (est * slo)  # seconds per bit, in SLOs
        decode_last = self._decode_slo[:, hi]
        if contiguous:
            # loaded part: chunks lo+j..hi for j text chunks at the front (j = 0..n_pending)
            prefix = self._bits_prefix
            bits_tail = prefix[:, hi + 1:hi + 2] - prefix[:, lo:hi + 2]
            compute_end = rec_prefix[lo:hi + 2] - (rec_prefix[lo] - compute_base)
        else:
            chunks = np.array(pending)
            bits_each = self._bits[:, chunks]
            bits_tail = np.concatenate([np.cumsum(bits_each[:, ::-1], axis=1)[:, ::-1],
                                        np.zeros((k, 1))], axis=1)
            rec_each = np.array([self._recompute[c] for c in pending])
            compute_end = compute_base + np.concatenate([[0.0], np.cumsum(rec_each)])
        loads = self._loads.get(n_pending)
        if loads is None:  # loaded chunks for j = 0..n_pending text chunks at the front
            loads = self._loads[n_pending] = np.arange(n_pending, -1, -1, dtype=np.float64)
        # finish times in SLOs: the link's (RTTs, bits, the last chunk's decode) and the compute unit's
        link_end = bits_tail * scale
        link_end += loads * (rtt / slo) + (link_base / slo)
        link_end += decode_last[:, None]
        link_end[:, -1] = 0.0
        finish = np.maximum(link_end, compute_end * (1.0 / slo), out=link_end)
        best_j = finish.argmin(axis=1)
        level = np.empty((6, k))
        level[0] = self._loss[:, hi]
        level[1] = self._bits[:, hi] * scale
        level[1] += rtt / slo
        level[2] = decode_last
        level[3] = finish[:, 0]
        level[4] = finish[self._rows, best_j]
        np.subtract(r, level[3:5], out=level[3:5])
        level[5] = best_j * (1.0 / n_pending)
        if self._missing:
            np.nan_to_num(level, copy=False, nan=-CLIP, posinf=CLIP, neginf=-CLIP)
        np.minimum(level, CLIP, out=level)
        np.maximum(level, -CLIP, out=level)
        level *= valid_levels
        out[:k, g + 4:] = level.T
        if valid_levels.any():
            b = int(np.where(valid_levels, level[4], -np.inf).argmax())
            text[g + 8] = level[4, b]
            text[g + 9] = level[5, b]
