"""Which convs a conversion leaves alone by default, and checks on the patterns that select them.

The default skips (stem, 1x1 input, not run by the probe) keep applying inside an
include glob: a glob narrows the scope, it does not force. A conv is forced by naming
it exactly in an include, or by a recipe rule with ``skip: false``. A skip reason must
be true: a conv whose input is 1x1 is a gate on a pooled map only if its input stays
1x1 at a larger input size; otherwise the probe size shrank the map, and that is said.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .errors import UserError
from .probe import ConvSite, ProbeError, probe
from .recipe import Recipe, name_matches

GLOB_CHARS = "*?["


class SelectionError(UserError):
    """An include/exclude/rule pattern matches no conv, or nothing would be converted."""


@dataclass
class RuleReport:
    """One recipe rule: what it matches, what it does, and how many convs it matched."""

    index: int
    match: str
    action: str
    convs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_exact(pattern: str) -> bool:
    """Whether ``pattern`` names one conv (no glob characters, not a regex)."""
    return not pattern.startswith("re:") and not any(c in pattern for c in GLOB_CHARS)


def named_exactly(site: ConvSite, include: list[str]) -> bool:
    """Whether an include pattern is exactly one of ``site``'s names (which forces it)."""
    return any(is_exact(p) and p in site.names for p in include)


def default_skip_reason(site: ConvSite, shrunk: set[str], size: tuple[int, int]) -> str | None:
    """Why the default selection leaves ``site`` alone, or ``None`` (an exact include name or a rule forces it)."""
    if site.calls == 0:
        return "not run by the probe forward (e.g. a training-only auxiliary head)"
    if site.reads_image:
        return "stem: reads the image channels"
    if site.input_hw == (1, 1):
        if site.name in shrunk:
            return (
                f"input is 1x1 spatially at the probe size {size[0]}x{size[1]} only: the feature map has shrunk to "
                "one pixel (a larger input size converts it)"
            )
        return "input is 1x1 spatially at any input size (it reads a pooled map, e.g. a squeeze-excite gate)"
    return None


def shrunk_by_probe(
    model: nn.Module, sites: list[ConvSite], shape: tuple[int, int, int], native: tuple[int, int, int]
) -> set[str]:
    """Names of the convs with a 1x1 input whose input grows with a twice larger probe (not gates).

    At the model's own input size (``native``) or above, a 1x1 input is a gate: models are
    made so that their maps do not shrink to one pixel there. Below it, this costs one more
    (small) forward when some conv saw a 1x1 input; a model that does not run at twice the
    size is taken at its word, its 1x1 inputs treated as gates.
    """
    one_pixel = [ConvSite(list(s.names), s.module) for s in sites if s.input_hw == (1, 1)]
    if not one_pixel or (shape[1] >= native[1] and shape[2] >= native[2]):
        return set()
    channels, height, width = shape
    try:
        probe(model, one_pixel, (channels, 2 * height, 2 * width))
    except ProbeError:
        return set()
    return {s.name for s in one_pixel if s.input_hw is not None and s.input_hw != (1, 1)}


def check_patterns(include: list[str], exclude: list[str], spec: Recipe, sites: list[ConvSite]) -> list[RuleReport]:
    """Each recipe rule's report; every include/exclude/rule name pattern that matches no conv is
    reported at once, with close names and every rule's match count, as a :class:`SelectionError`."""
    names = [n for site in sites for n in site.names]
    reports = [
        RuleReport(index, _describe_match(rule), _describe_action(rule), sum(rule.match.matches(s) for s in sites))
        for index, rule in enumerate(spec.rules)
    ]
    groups = [("include", include), ("exclude", exclude)]
    groups += [(f"recipe rule {i}", rule.match.name or []) for i, rule in enumerate(spec.rules)]
    problems = []
    for what, patterns in groups:
        for pattern in patterns:
            if not any(name_matches(pattern, n) for n in names):
                stem = pattern.removeprefix("re:").replace("*", "").replace("?", "")
                close = difflib.get_close_matches(stem, list(dict.fromkeys(names)), n=5, cutoff=0.4)
                hint = f" (close conv names: {', '.join(close)})" if close else ""
                problems.append(f"{what} pattern {pattern!r} matches no conv in the model{hint}")
    if problems:
        counts = ", ".join(f"rule {r.index} {r.convs}" for r in reports)
        tail = f"; convs each recipe rule matches: {counts}" if reports else ""
        raise SelectionError("; ".join(problems) + tail)
    return reports


def _describe_match(rule: Any) -> str:
    criteria = rule.match.model_dump(exclude_none=True)
    return ", ".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in criteria.items()) or "all"


def _describe_action(rule: Any) -> str:
    if rule.skip is True:
        return "skip"
    options = ", ".join(f"{k}={v}" for k, v in rule.set_options().items())
    return ("keep" + (", " if options else "") if rule.skip is False else "") + options


def nothing_converted(skipped: list[Any]) -> SelectionError:
    """The error for a conversion that would convert no conv: how many were skipped, and why."""
    if not skipped:
        return SelectionError("the model has no Conv2d to convert")
    reasons: dict[str, int] = {}
    for record in skipped:
        reasons[record.reason] = reasons.get(record.reason, 0) + 1
    why = "; ".join(f"{count} {reason}" for reason, count in reasons.items())
    return SelectionError(
        f"no conv would be converted: all {len(skipped)} are left static ({why}); widen the include patterns, "
        "narrow the exclude patterns or the recipe's skips"
    )
