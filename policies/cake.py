"""`cake`: Cake as published (Jin, Liu, Zhang, Mao, ICML 2025; arXiv 2410.03065 v2, Algorithm 1): compute
the context from the front on the GPU and load it from the back concurrently until the two pointers meet,
every loaded chunk at one fixed level. See ``reference/streaming-and-policies.md`` section 2.

Algorithm 1, and how it maps onto kvcast's engine:

* ``compute_ptr = 0``, ``io_ptr = T - 1``. Here the pointers are the lowest and the highest undecided chunk
  (``obs.pending[0]`` and ``obs.pending[-1]``).
* **Compute thread**: while ``compute_ptr < io_ptr``, prefill the chunk at ``compute_ptr`` and advance. Here:
  whenever the compute unit is idle, the lowest undecided chunk becomes `TEXT`. Its prefix is always ready in
  time, because every chunk before it was recomputed before it.
* **I/O thread**: while ``compute_ptr < io_ptr``, fetch the chunk ending at ``io_ptr`` and move back. Here:
  whenever the link takes another request, the highest undecided chunk is loaded at the fixed level.
* The threads stop when the pointers meet: here, when no chunk is undecided. Every chunk is decided exactly
  once, by whichever resource reaches it first (compute first when both are free at once, the order of
  Algorithm 1). Cake has no cost model and no deadline: the meeting point moves by itself with the link's and
  the GPU's speed (section 2.5), and both resources always work, even where one alone would be faster (its
  reported losses, section 2.7).

**One fixed level.** Cake loads the KV as stored, 16-bit by default (lossless; no quality metric) and 8- or
3-bit KVQuant in its Table 6. Argument ``cake:<level>`` (``cake:int8``, ``cake:raw``); default: the menu's
least-loss level (``raw`` where the menu has it, the uncompressed KV Cake loads).

**Batched retrieval** (App. B: chunk hashes queued in reverse order, a batched retrieve from the store): up to
`inflight` load requests in flight at once (`Policy.max_inflight`; default 2), sharing the link; each pays its
own RTT, but the RTTs overlap the other transfers instead of idling the link. More requests in flight save
round trips but overshoot the meeting point by up to ``inflight - 1`` chunks that the link took while the GPU
could have. ``inflight=1`` is one request at a time.

**Chunk sizes.** Cake computes in chunks of vLLM's token budget (512 tokens) and fetches 128-token I/O chunks
(section 2.4). kvcast cuts a context once, into the menu's chunks (``kvcast simulate --chunk-tokens``, 1,536
by default, CacheGen's size), which are both the unit of encoding and the unit of recompute: the compute and
I/O chunks are the same and cannot be smaller than a menu chunk. ``--chunk-tokens 512`` gives Cake's compute
chunk; its 128-token I/O chunk would pay an RTT every 128 tokens on a network link (Cake's I/O is an emulated
delay without RTT), which batched retrieval here amortises instead.

Arguments: ``cake``, ``cake:<level>``, or ``cake:level=<level>+inflight=<n>``.
"""

from __future__ import annotations

from kvcast.policies.base import TEXT, Decision, Observation, Policy, Session, by_quality

__all__ = ["CakePolicy", "DEFAULT_INFLIGHT"]

DEFAULT_INFLIGHT = 2
"""Load requests Cake keeps in flight (batched retrieval): two already keep the link busy through every RTT."""


def parse_cake_options(options: str | None, name: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """``key=value+key=value`` (or a bare level name, for ``level``) as a dict; ValueError on unknown keys."""
    out: dict[str, str] = {}
    for part in (options.split("+") if options else ()):
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "level", part
        if key not in allowed or not value:
            raise ValueError(f"{name}: bad option {part!r}; expected {', '.join(k + '=...' for k in allowed)}")
        out[key] = value
    return out


def parse_inflight(value: str, name: str) -> int:
    try:
        inflight = int(value)
    except ValueError:
        inflight = 0
    if inflight < 1:
        raise ValueError(f"{name}: inflight must be an integer >= 1, got {value!r}")
    return inflight


class CakePolicy(Policy):
    """Compute from the front, load from the back at one level, until the pointers meet."""

    name = "cake"

    def __init__(self, options: str | None = None) -> None:
        opts = parse_cake_options(options, "cake", ("level", "inflight"))
        self.level = opts.get("level")
        self.max_inflight = parse_inflight(opts.get("inflight", str(DEFAULT_INFLIGHT)), "cake")

    def reset(self, session: Session) -> None:
        super().reset(session)
        if self.level is None:
            self.load_level = by_quality(session.menus)[0]
        else:
            self.load_level = self.level
            for menu in session.menus:
                try:
                    menu.option(self.level)
                except KeyError as exc:
                    raise ValueError(f"cake:{self.level}: {exc.args[0]}") from None

    def decide(self, obs: Observation) -> Decision | None:
        pending = obs.pending
        if obs.compute_idle:
            return Decision(pending[0], TEXT)
        if obs.link_idle:
            return Decision(pending[-1], self.load_level)
        return None
