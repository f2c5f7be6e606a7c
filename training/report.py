"""HTML reports of training runs and evaluations: training curves and confusion matrices.

One self-contained file: the plots are matplotlib SVGs inlined in the page (no external
files, no scripts), the text goes through Jinja2 with autoescaping, so label names or
data paths cannot inject markup.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from jinja2 import Environment
from markupsafe import Markup

from training.metrics import ClassificationMetrics
from training.run import write_atomic

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:1rem}
.plots figure{margin:0}.note{color:#555}
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">Generated {{ generated }}.</p>
{% if facts %}<table>
{% for key, value in facts.items() %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}
</table>{% endif %}
{% if curves %}<h2>Training curves</h2>
<div class="plots">{% for svg in curves %}<figure>{{ svg }}</figure>{% endfor %}</div>{% endif %}
{% for section in sections %}
<h2>{{ section.name }}</h2>
<table><tr><th>figure</th><th>value</th></tr>
{% for key, value in section.summary.items() %}<tr><td>{{ key }}</td><td>{{ value }}</td></tr>{% endfor %}
</table>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for row in section.per_class %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</table>
<div class="plots"><figure>{{ section.confusion_svg }}</figure></div>
{% endfor %}
{% if subgroups %}<h2>Per-subgroup metrics</h2>
<table><tr><th>subgroup</th><th>samples</th><th>accuracy</th><th>macro-F1</th><th>UAR</th><th>engaged AUC</th></tr>
{% for name, m in subgroups.items() %}<tr><td>{{ name }}</td><td>{{ m.count }}</td><td>{{ fmt(m.accuracy) }}</td>
<td>{{ fmt(m.macro_f1) }}</td><td>{{ fmt(m.uar) }}</td><td>{{ fmt(m.engaged_auc) }}</td></tr>{% endfor %}
</table>{% endif %}
</body></html>
"""


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"


def _svg(figure: object) -> Markup:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(figure)  # type: ignore[arg-type]
    text = buffer.getvalue()
    # Drop the XML prolog and DOCTYPE: inline SVG in HTML starts at the <svg> element.
    # The SVG is produced by matplotlib from numbers and escaped labels, hence safe markup.
    return Markup(text[text.find("<svg"):])


def curve_plots(history: Sequence[Mapping[str, float]]) -> list[Markup]:
    """SVG plots of losses and of every validation figure over the epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return []
    epochs = [line["epoch"] for line in history]
    plots = []
    losses = [key for key in ("train_loss", "val_loss") if key in history[0]]
    figure, axes = plt.subplots(figsize=(5, 3.2))
    for key in losses:
        axes.plot(epochs, [line.get(key, np.nan) for line in history], marker="o", label=key)
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.legend()
    axes.set_title("loss")
    plots.append(_svg(figure))
    scores = sorted(key for key in history[0] if key.startswith("val_") and key != "val_loss"
                    and key != "val_count")
    if scores:
        figure, axes = plt.subplots(figsize=(5, 3.2))
        for key in scores:
            axes.plot(epochs, [line.get(key, np.nan) for line in history], marker="o", label=key)
        axes.set_xlabel("epoch")
        axes.set_title("validation")
        axes.legend(fontsize="small")
        plots.append(_svg(figure))
    return plots


def confusion_plot(metrics: ClassificationMetrics, title: str) -> Markup:
    """SVG heat map of a confusion matrix, rows normalised, with the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = metrics.confusion
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape, np.float64), where=totals > 0)
    size = 1.2 + 0.55 * len(metrics.labels)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(metrics.labels)), metrics.labels, rotation=45, ha="right")
    axes.set_yticks(range(len(metrics.labels)), metrics.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            axes.text(column, row, str(int(matrix[row, column])), ha="center", va="center",
                      color="white" if shares[row, column] > 0.5 else "black", fontsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    return _svg(figure)


def render_report(
    title: str,
    *,
    history: Sequence[Mapping[str, float]] = (),
    evaluations: Mapping[str, ClassificationMetrics] | None = None,
    subgroups: Mapping[str, ClassificationMetrics] | None = None,
    facts: Mapping[str, object] | None = None,
) -> str:
    """The report page as a string."""
    sections = []
    for name, metrics in (evaluations or {}).items():
        per_class = [
            (label, _fmt(p), _fmt(r), _fmt(f), int(s))
            for label, p, r, f, s in zip(metrics.labels, metrics.precision, metrics.recall, metrics.f1,
                                         metrics.confusion.sum(axis=1), strict=True)
        ]
        summary = {key: (str(int(value)) if key == "count" else _fmt(value))
                   for key, value in metrics.summary().items()}
        sections.append({"name": name, "summary": summary, "per_class": per_class,
                         "confusion_svg": confusion_plot(metrics, name)})
    environment = Environment(autoescape=True)
    template = environment.from_string(_TEMPLATE)
    return template.render(
        title=title,
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        facts={str(k): str(v) for k, v in (facts or {}).items()},
        curves=curve_plots(history),
        sections=sections,
        subgroups=dict(subgroups or {}),
        fmt=_fmt,
    )


def write_report(path: Path, title: str, **content: object) -> Path:
    """Render :func:`render_report` and write it atomically to ``path``."""
    html = render_report(title, **content)  # type: ignore[arg-type]
    return write_atomic(path, html.encode("utf-8"))
