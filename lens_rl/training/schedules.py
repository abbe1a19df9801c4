"""Scalar schedules for loss weights and the Gumbel temperature, written as short strings.

Grammar (``step`` counts optimizer steps from 0)::

    "0.1"                          constant 0.1
    "linear:1.0->0.1@1000"         linear from 1.0 to 0.1 over steps [0, 1000], then 0.1
    "cosine:1.0->0.1@1000"         half-cosine from 1.0 to 0.1 over [0, 1000], then 0.1
    "linear:0->0.1@100+50"         hold 0 for 50 steps, then linear over the next 100 steps

The learning rate is scheduled by ``transformers.get_scheduler`` instead (warm-up and decay).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

_PATTERN = re.compile(
    r"^(?P<kind>linear|cosine):(?P<start>[-+0-9.eE]+)->(?P<end>[-+0-9.eE]+)@(?P<steps>\d+)(\+(?P<delay>\d+))?$"
)


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; call it with a step to get the value."""

    kind: str
    start: float
    end: float
    steps: int = 0
    delay: int = 0

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        t = min(max(step - self.delay, 0) / max(self.steps, 1), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * t))

    @property
    def max_value(self) -> float:
        """The largest value the schedule takes."""
        return max(self.start, self.end)


def parse_schedule(spec: str | float, name: str = "schedule") -> Schedule:
    """Parse a schedule string (see the module docstring); raise ``ValueError`` naming ``name``."""
    if isinstance(spec, int | float):
        return Schedule("constant", float(spec), float(spec))
    text = spec.strip()
    try:
        value = float(text)
        return Schedule("constant", value, value)
    except ValueError:
        pass
    m = _PATTERN.match(text)
    if not m:
        raise ValueError(
            f"{name}: cannot parse schedule {spec!r}; use a number, 'linear:A->B@STEPS' or "
            "'cosine:A->B@STEPS' (optionally '+DELAY')."
        )
    return Schedule(m["kind"], float(m["start"]), float(m["end"]), int(m["steps"]), int(m["delay"] or 0))


ScheduleFn = Callable[[int], float]
