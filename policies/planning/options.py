"""Options shared by the planning controllers (``mpc``, ``hybrid``): spec arguments and common defaults.

>>> parse_options("margin=0.1+weight=50", {"weight": 20.0, "margin": DEFAULT_SLO_MARGIN}, "mpc")
{'weight': 50.0, 'margin': 0.1}
>>> parse_options("30", {"weight": 20.0, "margin": DEFAULT_SLO_MARGIN}, "mpc")
{'weight': 30.0, 'margin': 0.05}
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DEFAULT_SLO_MARGIN", "parse_options"]

DEFAULT_SLO_MARGIN = 0.05
"""Plans aim at ``(1 - margin) * SLO``: a safety factor against prediction error, like sabre's 0.9."""


def parse_options(spec_argument: str | None, defaults: Mapping[str, float], policy: str) -> dict[str, float]:
    """Options of a policy spec's argument: ``key=value`` pairs joined by ``+``, as in
    ``mpc:margin=0.1+weight=50``.

    A bare number sets the first option. Unknown keys and non-numbers raise ValueError naming the policy.
    """
    out = dict(defaults)
    if not spec_argument:
        return out
    keys = list(defaults)
    for i, part in enumerate(spec_argument.split("+")):
        key, sep, value = part.partition("=")
        if not sep:
            if i or not keys:
                raise ValueError(f"{policy}: expected key=value in {spec_argument!r}; "
                                 f"keys: {', '.join(keys)}")
            key, value = keys[0], part
        key = key.strip()
        if key not in out:
            raise ValueError(f"{policy}: unknown option {key!r}; known: {', '.join(keys)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"{policy}: option {key}={value!r} is not a number") from None
    return out
