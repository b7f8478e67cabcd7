"""PNG figures of a routing analysis, drawn with matplotlib (the optional ``figures`` extra).

No pyplot and no global backend: each figure is a ``matplotlib.figure.Figure`` saved
through the Agg canvas, so drawing never opens a window or changes a user's session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .analyze import Analysis, LayerStats
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


def draw_heatmap(analysis: Analysis, layers: list[LayerStats], path: Path) -> Path:
    """Mean routing weight per class (rows) and expert (columns), one panel per layer."""
    figure = _figure(3.2 * len(layers) + 0.8, 0.28 * max(len(analysis.classes), 1) + 1.8)
    panels = figure.subplots(1, len(layers), squeeze=False)[0]
    for axes, stats in zip(panels, layers, strict=True):
        rows = stats.class_means if stats.class_means is not None else [stats.mean_routing]
        labels = analysis.classes if stats.class_means is not None else ["all images"]
        image = axes.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
        axes.set_title(stats.name, fontsize=9)
        axes.set_xlabel("expert")
        axes.set_xticks(range(stats.experts))
        axes.set_yticks(range(len(labels)))
        axes.set_yticklabels(labels, fontsize=7)
        figure.colorbar(image, ax=axes, shrink=0.8)
    panels[0].set_ylabel("class")
    figure.suptitle("Mean routing weight per class and expert", fontsize=10)
    figure.savefig(path)
    return path


def draw_by_depth(layers: list[LayerStats], values: list[float | None], title: str, ylabel: str, path: Path) -> Path:
    """One value per layer in forward order, as a line with markers (missing values left out)."""
    figure = _figure(max(6.0, 0.18 * len(layers) + 2.5), 4.2)
    axes = figure.subplots()
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    axes.plot([i for i, _ in points], [v for _, v in points], marker="o", markersize=3)
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    _depth_axis(axes, layers)
    return _save(figure, axes, path)


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(figure: Any, axes: Any, path: Path) -> Path:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.savefig(path)
    return path


def write_figures(analysis: Analysis, folder: str | Path, heatmap: list[LayerStats] | None = None) -> list[Path]:
    """Write the heat map (``heatmap`` layers, default :func:`heatmap_layers`) and the by-depth plots
    into ``folder`` (created if missing); return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = analysis.layers
    written = [draw_heatmap(analysis, heatmap or heatmap_layers(analysis), folder / HEATMAP)]
    entropy = [s.entropy for s in layers]
    title = "Routing entropy by depth (1 = uniform)"
    written.append(draw_by_depth(layers, entropy, title, "normalised entropy", folder / ENTROPY))
    figure = _figure(max(6.0, 0.18 * len(layers) + 2.5), 4.2)
    axes = figure.subplots()
    index = list(range(len(layers)))
    now = [_number(s.spread) for s in layers]
    start = [_number(s.spread_at_conversion) for s in layers]
    axes.plot(index, now, marker="o", markersize=3, label="now")
    axes.plot(index, start, linestyle="--", label="at conversion (noise)")
    if all(v > 0 for v in now + start):  # NaN compares False: linear then
        axes.set_yscale("log")
    axes.set_title("Relative spread of the expert kernels by depth", fontsize=10)
    axes.set_ylabel("|W_k - mean| / |mean|")
    _depth_axis(axes, layers)
    written.append(_save(figure, axes, folder / SPREAD))
    if any(s.class_ratio is not None for s in layers):
        ratios = [s.class_ratio for s in layers]
        title = "How class-specific the routing is, by depth"
        written.append(draw_by_depth(layers, ratios, title, "between / within class variance", folder / CLASS_RATIO))
    return written
