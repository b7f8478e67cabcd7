"""PNG figures of a routing analysis, drawn with matplotlib (the optional ``figures`` extra).

No pyplot and no global backend: each figure is a ``matplotlib.figure.Figure`` saved
through the Agg canvas, so drawing never opens a window or changes a user's session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .analyze import COLLAPSED, FIXED_MIX, INPUT_DEPENDENT, OFF, UNIFORM, Analysis, LayerStats
from .errors import UserError

#: The files :func:`write_figures` writes (the class figures only when the folder has classes).
HEATMAP = "routing_by_class.png"
ENTROPY = "entropy_by_depth.png"
SPREAD = "expert_spread_by_depth.png"
CLASS_RATIO = "class_ratio_by_depth.png"


class FiguresUnavailableError(UserError):
    """matplotlib is not installed, so no PNG figure can be drawn."""


def require_matplotlib() -> None:
    """Raise :class:`FiguresUnavailableError` (naming the extra) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FiguresUnavailableError(
            "PNG figures need matplotlib, which is not installed; install the figures extra: "
            "pip install 'dynconv[figures]'"
        ) from None


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def heatmap_layers(analysis: Analysis, count: int = 4) -> list[LayerStats]:
    """Up to ``count`` layers spread over the depth, the first and the last included."""
    layers = analysis.layers
    if len(layers) <= count:
        return list(layers)
    picks = sorted({round(i * (len(layers) - 1) / (count - 1)) for i in range(count)})
    return [layers[i] for i in picks]


def _depth_axis(axes: Any, layers: list[LayerStats]) -> None:
    step = max(1, len(layers) // 24)
    ticks = list(range(0, len(layers), step))
    axes.set_xticks(ticks)
    axes.set_xticklabels([layers[i].name for i in ticks], rotation=90, fontsize=7)
    axes.set_xlabel("layer (forward order)")
    axes.grid(alpha=0.3)


#: The verdicts, in legend order, with their marker colours.
VERDICT_COLOURS = {
    UNIFORM: "tab:gray",
    FIXED_MIX: "tab:orange",
    INPUT_DEPENDENT: "tab:green",
    COLLAPSED: "tab:red",
    OFF: "black",
}
#: The heat map's colour scale reaches at least this far from uniform, so rounding noise stays pale.
HEATMAP_MIN_RANGE = 0.05


def class_deviation(stats: LayerStats) -> list[list[float]]:
    """Per class (or for all images), the mean routing share of each expert minus the uniform ``1/K``."""
    rows = stats.class_means if stats.class_means is not None else [stats.mean_routing]
    return [[w / (sum(row) or 1.0) - 1 / stats.experts for w in row] for row in rows]


def heatmap_figure(analysis: Analysis, layers: list[LayerStats]) -> Any:
    """Routing share minus uniform per class (rows) and expert (columns), one panel per layer, one colour scale."""
    deviations = [class_deviation(stats) for stats in layers]
    limit = max([HEATMAP_MIN_RANGE, *(abs(v) for rows in deviations for row in rows for v in row)])
    figure = _figure(3.0 * len(layers) + 1.6, 0.28 * max(len(analysis.classes), 1) + 1.9)
    panels = figure.subplots(1, len(layers), squeeze=False)[0]
    image = None
    for axes, stats, rows in zip(panels, layers, deviations, strict=True):
        labels = analysis.classes if stats.class_means is not None else ["all images"]
        image = axes.imshow(rows, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axes.set_title(f"{stats.name}\n{stats.verdict}", fontsize=8)
        axes.set_xlabel("expert")
        axes.set_xticks(range(stats.experts))
        axes.set_yticks(range(len(labels)))
        axes.set_yticklabels(labels if axes is panels[0] else [], fontsize=7)
    panels[0].set_ylabel("class")
    figure.colorbar(image, ax=list(panels), shrink=0.8, label="routing share − uniform (1/K)")
    figure.suptitle("Routing per class and expert: deviation from uniform (white = uniform)", fontsize=10)
    return figure


def _by_depth(layers: list[LayerStats]) -> tuple[Any, Any]:
    figure = _figure(max(6.0, 0.18 * len(layers) + 2.5), 4.4)
    return figure, figure.subplots()


def _verdict_markers(axes: Any, layers: list[LayerStats], values: list[float]) -> None:
    """The points of ``values`` coloured by each layer's verdict, one legend entry per verdict present."""
    for verdict, colour in VERDICT_COLOURS.items():
        points = [(i, v) for i, (s, v) in enumerate(zip(layers, values, strict=True)) if s.verdict == verdict]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.scatter(xs, ys, s=22, color=colour, zorder=3, label=verdict)


def entropy_figure(layers: list[LayerStats]) -> Any:
    """Entropy and margin over uniform by depth on a fixed 0-1 axis, each layer's verdict as the marker colour."""
    figure, axes = _by_depth(layers)
    index = list(range(len(layers)))
    entropy = [s.entropy for s in layers]
    axes.plot(index, entropy, color="tab:blue", linewidth=1, label="entropy (1 = uniform)")
    axes.plot(index, [s.margin for s in layers], color="tab:purple", linewidth=1, linestyle="--",
              label="margin of the top expert over uniform (0 = uniform)")  # fmt: skip
    _verdict_markers(axes, layers, entropy)
    axes.set_ylim(0.0, 1.05)
    axes.set_title("Routing entropy by depth (verdict per layer as the marker colour)", fontsize=10)
    axes.set_ylabel("normalised entropy / margin")
    _depth_axis(axes, layers)
    axes.legend(fontsize=7, loc="lower left")
    return figure


def spread_figure(layers: list[LayerStats]) -> Any:
    """The experts' relative spread by depth on an axis from 0, the conversion's noise level drawn for reference."""
    figure, axes = _by_depth(layers)
    index = list(range(len(layers)))
    now = [_number(s.spread) for s in layers]
    start = [_number(s.spread_at_conversion) for s in layers]
    axes.plot(index, now, marker="o", markersize=3, label="now")
    axes.plot(index, start, color="black", linestyle="--", linewidth=1, label="at conversion (the noise level)")
    finite = [v for v in now + start if v == v]
    axes.set_ylim(0.0, 1.15 * max(finite) if finite and max(finite) > 0 else 1.0)
    axes.set_title("Relative spread of the expert kernels by depth", fontsize=10)
    axes.set_ylabel("|W_k - mean| / |mean|")
    _depth_axis(axes, layers)
    axes.legend(fontsize=8)
    return figure


def class_ratio_figure(layers: list[LayerStats]) -> Any:
    """Between- over within-class variance of the routing by depth, on an axis from 0."""
    figure, axes = _by_depth(layers)
    points = [(i, s.class_ratio) for i, s in enumerate(layers) if s.class_ratio is not None]
    axes.plot([i for i, _ in points], [v for _, v in points], marker="o", markersize=3)
    top = max((v for _, v in points), default=0.0)
    axes.set_ylim(0.0, 1.15 * top if top > 0 else 1.0)
    axes.set_title("How class-specific the routing is, by depth (0 = ignores the class)", fontsize=10)
    axes.set_ylabel("between / within class variance")
    _depth_axis(axes, layers)
    return figure


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def write_figures(analysis: Analysis, folder: str | Path, heatmap: list[LayerStats] | None = None) -> list[Path]:
    """Write the heat map (``heatmap`` layers, default :func:`heatmap_layers`) and the by-depth plots
    into ``folder`` (created if missing); return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = analysis.layers
    figures = {
        HEATMAP: heatmap_figure(analysis, heatmap or heatmap_layers(analysis)),
        ENTROPY: entropy_figure(layers),
        SPREAD: spread_figure(layers),
    }
    if any(s.class_ratio is not None for s in layers):
        figures[CLASS_RATIO] = class_ratio_figure(layers)
    written = []
    for name, figure in figures.items():
        figure.savefig(folder / name)
        written.append(folder / name)
    return written
