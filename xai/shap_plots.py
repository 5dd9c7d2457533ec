"""SHAP explanations for the biomarker response: features ranked by |SHAP| with the caller's values; bar and
waterfall plots as PNG data URLs, drawn only when asked (matplotlib's object API on Agg: no pyplot global state;
matplotlib is imported with the first plot, so a process that never draws one does not load it)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from core.cards.tabular import FeatureValue, HeadOutput
from core.schemas import ShapExplanation, ShapFeatureImportance, ShapHeadExplanation

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_DISPLAY = 10
"""Features a plot shows; the rest are summed into one bar."""
POSITIVE, NEGATIVE = "#ff0051", "#008bfb"
"""shap's colours: pushes the margin up / down."""


def feature_importance(
    shap_values: np.ndarray, values: Mapping[str, FeatureValue], features: Sequence[str]
) -> list[ShapFeatureImportance]:
    """One entry per feature, largest |SHAP| first (ties keep the card's order)."""
    order = sorted(range(len(features)), key=lambda i: -abs(float(shap_values[i])))
    return [
        ShapFeatureImportance(feature=features[i], importance=float(shap_values[i]), value=values[features[i]])
        for i in order
    ]


def explain_head(
    head: HeadOutput, values: Mapping[str, FeatureValue], features: Sequence[str]
) -> tuple[ShapHeadExplanation, float]:
    """The explanation of a head's predicted class, and that class's base value."""
    if head.shap_values is None or head.base_values is None:
        raise ValueError(f"head {head.name} carries no SHAP values (use the runner's explain)")
    shap_values, base = head.shap_values[head.top], float(head.base_values[head.top])
    explanation = ShapHeadExplanation(
        target_class=head.classes[head.top], margin=base + float(shap_values.sum()),
        feature_importance=feature_importance(shap_values, values, features),
    )
    return explanation, base


def shap_explanation(heads: Mapping[str, HeadOutput], values: Mapping[str, FeatureValue], features: Sequence[str],
                     plots: bool = False) -> ShapExplanation:
    """Every head's explanation; the first head's fills the SPEC.md fields and, when asked, the plots."""
    explained = {name: explain_head(head, values, features) for name, head in heads.items()}
    first = next(iter(explained))
    primary, base = explained[first]
    return ShapExplanation(
        head=first, target_class=primary.target_class, feature_importance=primary.feature_importance,
        base_values={name: base_value for name, (_, base_value) in explained.items()},
        heads={name: explanation for name, (explanation, _) in explained.items()},
        shap_plot_base64=bar_plot(primary, first) if plots else None,
        waterfall_plot_base64=waterfall_plot(primary, base, first) if plots else None,
    )


def _shown(explanation: ShapHeadExplanation) -> list[tuple[str, float]]:
    """(label, SHAP value) of the largest features, the remainder summed into one entry; largest first."""
    items = explanation.feature_importance
    shown = [(f"{item.feature} = {_format(item.value)}", item.importance) for item in items[:MAX_DISPLAY]]
    if len(items) > MAX_DISPLAY:
        shown.append((f"{len(items) - MAX_DISPLAY} other features", sum(i.importance for i in items[MAX_DISPLAY:])))
    return shown


def bar_plot(explanation: ShapHeadExplanation, head: str) -> str:
    """Horizontal bars of the largest SHAP values, largest on top."""
    shown = _shown(explanation)[::-1]
    figure, axes = _figure(len(shown))
    bars = axes.barh(range(len(shown)), [v for _, v in shown], color=[POSITIVE if v >= 0 else NEGATIVE for _, v in shown])
    axes.bar_label(bars, labels=[f"{v:+.3f}" for _, v in shown], fontsize=7, padding=2)
    axes.axvline(0.0, color="#444444", linewidth=0.8)
    _finish(axes, shown, f"SHAP value (log-odds of {explanation.target_class})", f"{head}: {explanation.target_class}")
    return figure_data_url(figure)


def waterfall_plot(explanation: ShapHeadExplanation, base_value: float, head: str) -> str:
    """From the base value (bottom) up to the margin (top), one bar per feature, largest on top."""
    shown = _shown(explanation)[::-1]
    figure, axes = _figure(len(shown))
    left = base_value
    for row, (_, value) in enumerate(shown):
        bar = axes.barh(row, value, left=left, color=POSITIVE if value >= 0 else NEGATIVE)
        axes.bar_label(bar, labels=[f"{value:+.3f}"], fontsize=7, padding=2)
        left += value
    axes.axvline(base_value, color="#888888", linestyle="--", linewidth=0.8)
    axes.axvline(explanation.margin, color="#444444", linewidth=0.8)
    _finish(axes, shown, f"margin (log-odds): base {base_value:.3f} -> {explanation.margin:.3f}",
            f"{head}: {explanation.target_class}")
    return figure_data_url(figure)


def figure_data_url(figure: Figure) -> str:
    """A matplotlib figure as `data:image/png;base64,...`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(rows: int) -> tuple[Figure, Axes]:
    """A figure with fixed margins (room for `group.feature = value` labels); automatic layout costs 100+ ms."""
    from matplotlib.figure import Figure

    height = 1.2 + 0.35 * rows
    figure = Figure(figsize=(8.0, height), dpi=100)
    figure.subplots_adjust(left=0.4, right=0.95, bottom=0.6 / height, top=1.0 - 0.4 / height)
    return figure, figure.add_subplot()


def _finish(axes: Axes, shown: list[tuple[str, float]], xlabel: str, title: str) -> None:
    axes.set_yticks(range(len(shown)), [label for label, _ in shown], fontsize=8)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_title(title, fontsize=10)
    axes.use_sticky_edges = False
    axes.margins(x=0.15)


def _format(value: FeatureValue) -> str:
    if value is None:
        return "missing"
    return f"{value:g}" if isinstance(value, float) else str(value)
