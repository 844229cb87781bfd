"""Geometry of the quality-vs-tokens/s plots, drawn as inline SVG by the templates.

Python computes where everything goes; the template (autoescaped) writes the elements, so no
string from the results reaches the SVG unescaped. Colours are CSS classes (``s0`` .. ``s11``,
``baseline``) resolved by CSS variables, and text uses ``currentColor``, so the same markup
reads on light and dark backgrounds. Every marker has a ``<title>`` (measure, threshold,
quality, tokens/s) that the browser shows on hover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from suite.fronts import Panel, Series

WIDTH, HEIGHT = 640, 380
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 16, 14, 48
PALETTE_SIZE = 12


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    shape: str
    """``circle`` (replay) or ``diamond`` (online, measured)."""
    css: str
    title: str
    measure: str
    mode: str
    threshold: float
    quality: float
    tokens_per_s: float
    front: bool
    error_top: float | None = None
    """Pixel y of the upper end of the quality interval (None: no interval)."""
    error_bottom: float | None = None

    @property
    def diamond_path(self) -> str:
        r = 4.6
        return (f"M{self.x:.2f} {self.y - r:.2f}L{self.x + r:.2f} {self.y:.2f}"
                f"L{self.x:.2f} {self.y + r:.2f}L{self.x - r:.2f} {self.y:.2f}Z")


@dataclass(frozen=True)
class Line:
    points: str
    css: str
    measure: str
    mode: str


@dataclass
class Figure:
    title: str
    x_label: str
    y_label: str
    width: int = WIDTH
    height: int = HEIGHT
    left: float = MARGIN_LEFT
    top: float = MARGIN_TOP
    right: float = WIDTH - MARGIN_RIGHT
    bottom: float = HEIGHT - MARGIN_BOTTOM
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    full_depth: Marker | None = None


def nice_step(span: float, count: int = 5) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about ``count`` ticks."""
    raw = span / max(count, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1.0, 2.0, 2.5, 5.0, 10.0):
        if multiple * magnitude >= raw * (1 - 1e-9):
            return multiple * magnitude
    return 10.0 * magnitude  # pragma: no cover - the loop always returns


def _domain(values: list[float], floor: float | None = None) -> tuple[float, float]:
    """The axis range of ``values`` with a little padding; never below ``floor`` (0 for
    quantities that cannot be negative: the metrics, tokens/s) when every value is above it."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return (0.0 if floor is None else floor), 1.0
    low, high = min(finite), max(finite)
    if high - low < 1e-12:
        pad = max(abs(high) * 0.05, 1.0)
        low, high = low - pad, high + pad
    else:
        pad = (high - low) * 0.06
        low, high = low - pad, high + pad
    if floor is not None and min(finite) >= floor:
        low = max(low, floor)
    return low, high


def _tick_label(value: float, step: float) -> str:
    if abs(value) < step * 1e-6:
        value = 0.0
    if step >= 1000:
        return _tick_label(value / 1000, step / 1000) + "k"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1  # steps like 2.5 x 10^k need one more digit
    return f"{value:,.{decimals}f}"


def ticks(low: float, high: float, to_pixel, count: int = 5) -> list[Tick]:
    step = nice_step(high - low, count)
    first = math.ceil(low / step - 1e-9)
    out = []
    index = first
    while index * step <= high + step * 1e-9:
        value = index * step
        out.append(Tick(to_pixel(value), _tick_label(value, step)))
        index += 1
    return out


def format_rate(value: float) -> str:
    """Tokens/s for people: three significant digits, thousands separated."""
    if not math.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) >= 1 else f"{value:.3g}"


def _interval(row) -> tuple[float, float] | None:
    low, high = getattr(row, "quality_ci_low", None), getattr(row, "quality_ci_high", None)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return float(low), float(high)


def point_title(row, metric: str) -> str:
    mode = "" if row.mode == "replay" else f" ({row.mode}, measured)"
    interval = _interval(row)
    ci = (f" (95% CI {interval[0]:.2f} to {interval[1]:.2f})"
          if interval and row.confidence_level == 0.95 else
          f" ({row.confidence_level:.0%} CI {interval[0]:.2f} to {interval[1]:.2f})"
          if interval else "")
    latency = (f"\np99 TTFT {row.ttft_p99_seconds * 1e3:.3g} ms, TPOT "
               f"{row.tpot_p99_seconds * 1e3:.3g} ms"
               if getattr(row, "ttft_p99_seconds", None) is not None
               and getattr(row, "tpot_p99_seconds", None) is not None else "")
    setting = (f"threshold {row.threshold:g}" if row.method == "early_exit"
               else f"{row.method} {method_setting(row)}")
    title = (f"{row.measure}{mode}\n{setting}\n{metric} {row.quality:.2f}{ci}\n"
             f"{format_rate(row.tokens_per_s)} tokens/s ({row.speedup:.2f}x full depth)\n"
             f"mean layers {row.mean_layers_used:.2f} of {row.num_layers}{latency}")
    calibration = row.extra.get("calibration") if isinstance(row.extra, dict) else None
    if isinstance(calibration, dict):
        title += (f"\ncalibrated: {calibration.get('risk')} <= {calibration.get('epsilon')} with "
                  f"probability >= 1 - {calibration.get('delta')}; test risk "
                  f"{calibration.get('test_risk')}")
    return title


def method_setting(row) -> str:
    """A decoding method's options for people (``E=3 k=4``, the stopping rule) and its mean
    accepted tokens per cycle."""
    import json

    from suite.speculative.method import options_label

    try:
        options = json.loads(row.method_options or "{}")
    except ValueError:
        return str(row.method_options)
    text = options_label(options) if isinstance(options, dict) else str(options)
    if row.mean_accepted_tokens is not None:
        text += f", {row.mean_accepted_tokens:.2f} tokens/cycle"
    return text


def colour_class(measure: str, colour_index: dict[str, int]) -> str:
    if measure == "static_layer":
        return "baseline"
    return f"s{colour_index.get(measure, 0) % PALETTE_SIZE}"


def panel_figure(panel: Panel, colour_index: dict[str, int],
                 only: set[str] | None = None) -> Figure:
    """The figure of a panel; ``only`` keeps those measures (plus the baseline)."""
    series: list[Series] = [s for s in panel.series
                            if only is None or s.measure in only or s.is_baseline]
    figure = Figure(
        title=f"{panel.metric} vs tokens/s: {panel.task}, {panel.profile}, batch "
              f"{panel.batch_size}",
        x_label=f"tokens/s ({panel.profile}, batch {panel.batch_size})",
        y_label=f"{panel.metric} (%)")
    xs = [r.tokens_per_s for s in series for r in s.rows] + [panel.full_depth_tokens_per_s]
    ys = [r.quality for s in series for r in s.rows] + [panel.full_depth_quality] + \
        [v for s in series for r in s.rows for v in (_interval(r) or ())]
    # tokens/s and the task metrics (EM, F1, BLEU, ROUGE) are never negative
    x_low, x_high = _domain(xs, floor=0.0)
    y_low, y_high = _domain(ys, floor=0.0)

    def to_x(value: float) -> float:
        return figure.left + (value - x_low) / (x_high - x_low) * (figure.right - figure.left)

    def to_y(value: float) -> float:
        return figure.bottom - (value - y_low) / (y_high - y_low) * (figure.bottom - figure.top)

    figure.x_ticks = ticks(x_low, x_high, to_x)
    figure.y_ticks = ticks(y_low, y_high, to_y)
    # the baseline first, so measures are drawn over it
    for s in sorted(series, key=lambda s: (not s.is_baseline, s.measure, s.mode)):
        colour = colour_class(s.measure, colour_index)
        mode_css = "online" if s.mode != "replay" else "replay"
        front = s.front_rows()
        if len(front) > 1:
            figure.lines.append(Line(
                " ".join(f"{to_x(r.tokens_per_s):.2f},{to_y(r.quality):.2f}" for r in front),
                f"front {colour} {mode_css}", s.measure, s.mode))
        for row, on_front in zip(s.rows, s.front):
            interval = _interval(row)
            figure.markers.append(Marker(
                x=to_x(row.tokens_per_s), y=to_y(row.quality),
                shape="diamond" if s.mode != "replay" else "circle",
                css=f"point {colour} {mode_css}" + ("" if on_front else " off-front")
                + (" calibrated" if "calibration" in row.extra else ""),
                title=point_title(row, panel.metric), measure=s.measure, mode=s.mode,
                threshold=row.threshold, quality=row.quality, tokens_per_s=row.tokens_per_s,
                front=bool(on_front),
                error_top=to_y(interval[1]) if interval else None,
                error_bottom=to_y(interval[0]) if interval else None))
    if math.isfinite(panel.full_depth_tokens_per_s) and math.isfinite(panel.full_depth_quality):
        figure.full_depth = Marker(
            x=to_x(panel.full_depth_tokens_per_s), y=to_y(panel.full_depth_quality),
            shape="circle", css="full-depth",
            title=(f"full depth (all {panel.num_layers} layers)\n{panel.metric} "
                   f"{panel.full_depth_quality:.2f}\n"
                   f"{format_rate(panel.full_depth_tokens_per_s)} tokens/s"),
            measure="full depth", mode="replay", threshold=math.nan,
            quality=panel.full_depth_quality, tokens_per_s=panel.full_depth_tokens_per_s,
            front=False)
    return figure
