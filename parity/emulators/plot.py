"""The PNG beside each emulator's parity.json: error per kernel call and per
decode step, on a log scale, with the tolerance drawn, so that a failure
points at the kernel (or the step) where the device diverged.

Drawn with Pillow alone (no plotting library in the dependencies).
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, PANEL_H, MARGIN_L, MARGIN_R, TOP = 1200, 330, 70, 20, 40
LOG_MIN, LOG_MAX = -9.0, 1.0
GREEN, RED, GREY, BLUE, BLACK = (
    (40, 150, 60),
    (210, 40, 40),
    (150, 150, 150),
    (40, 90, 200),
    (0, 0, 0),
)
SERIES = [
    (40, 90, 200),
    (230, 130, 20),
    (130, 60, 170),
    (20, 160, 160),
    (200, 60, 120),
    (110, 110, 40),
]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _y(value: float, top: int, height: int) -> float:
    if math.isnan(value) or math.isinf(value):
        v = LOG_MAX
    else:
        v = math.log10(value) if value > 0 else LOG_MIN
    v = min(max(v, LOG_MIN), LOG_MAX)
    return top + height * (LOG_MAX - v) / (LOG_MAX - LOG_MIN)


def _axes(
    draw: ImageDraw.ImageDraw,
    top: int,
    height: int,
    title: str,
    xlabel: str,
    tolerance: float | None,
) -> None:
    font = _font(13)
    draw.text((MARGIN_L, top - 22), title, fill=BLACK, font=_font(15))
    draw.rectangle([MARGIN_L, top, W - MARGIN_R, top + height], outline=BLACK)
    for e in range(int(LOG_MIN), int(LOG_MAX) + 1):
        y = _y(10.0**e, top, height)
        draw.line([MARGIN_L, y, W - MARGIN_R, y], fill=(225, 225, 225))
        draw.text((8, y - 7), f"1e{e}", fill=BLACK, font=font)
    if tolerance:
        y = _y(tolerance, top, height)
        for x in range(MARGIN_L, W - MARGIN_R, 12):
            draw.line([x, y, min(x + 6, W - MARGIN_R), y], fill=RED, width=2)
        draw.text((W - MARGIN_R - 150, y - 16), f"tolerance {tolerance:g}", fill=RED, font=font)
    draw.text((MARGIN_L, top + height + 6), xlabel, fill=BLACK, font=font)


def _kernel_panel(draw, top: int, rows: list[dict], tolerance: float) -> None:
    ran = [r for r in rows if r["status"] in ("pass", "fail", "error")]
    _axes(
        draw,
        top,
        PANEL_H,
        "max relative error of each kernel call (device vs host twin, same inputs)",
        "kernel calls in execution order (bottom row: bit-exact; red: over tolerance or failed to run)",
        tolerance,
    )
    if not ran:
        return
    font = _font(12)
    width = W - MARGIN_L - MARGIN_R
    x_of = {r["index"]: MARGIN_L + width * (i + 0.5) / len(ran) for i, r in enumerate(ran)}
    last_step = None
    for r in ran:  # step boundaries
        if r["step"] != last_step:
            x = x_of[r["index"]]
            draw.line([x, top, x, top + PANEL_H], fill=GREY)
            draw.text((x + 3, top + 3), r["step"], fill=GREY, font=font)
            last_step = r["step"]
    labelled: list[str] = []  # each failing kernel named once, at its first call
    for r in ran:
        value = r.get("max_rel", math.inf) if r["status"] != "error" else math.inf
        x, y = x_of[r["index"]], _y(value, top, PANEL_H)
        color = GREEN if r["status"] == "pass" else RED
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
        name = r.get("device_kernel", r["kernel"])
        if r["status"] != "pass" and name not in labelled and len(labelled) < 4:
            draw.text((min(x + 5, W - 260), y + 4 + 14 * len(labelled)), name, fill=RED, font=font)
            labelled.append(name)


def _step_panel(draw, top: int, series: dict[str, list[float]], tolerance: float | None) -> None:
    _axes(
        draw,
        top,
        PANEL_H,
        "max relative logit error per decode step (device vs transformers)",
        "decode step",
        tolerance,
    )
    steps = max((len(v) for v in series.values()), default=0)
    if not steps:
        return
    font = _font(12)
    width = W - MARGIN_L - MARGIN_R
    for k, (name, values) in enumerate(series.items()):
        color = SERIES[k % len(SERIES)]
        pts = [
            (MARGIN_L + width * (i + 0.5) / steps, _y(v, top, PANEL_H))
            for i, v in enumerate(values)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((MARGIN_L + 8 + 160 * k, top + PANEL_H - 18), name, fill=color, font=font)


def plot(
    path: Path,
    title: str,
    *,
    kernels: list[dict] | None = None,
    kernel_tolerance: float | None = None,
    steps: dict[str, list[float]] | None = None,
    step_tolerance: float | None = None,
    note: str | None = None,
) -> Path:
    """Write the PNG: a kernel panel and/or a decode-step panel."""
    panels = [p for p in (kernels is not None, steps is not None) if p]
    height = TOP + len(panels) * (PANEL_H + 60) + (30 if note else 0) + 10
    image = Image.new("RGB", (W, max(height, 120)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN_L, 8), title, fill=BLACK, font=_font(17))
    top = TOP + 30
    if kernels is not None:
        _kernel_panel(draw, top, kernels, kernel_tolerance or 0)
        top += PANEL_H + 60
    if steps is not None:
        _step_panel(draw, top, steps, step_tolerance)
        top += PANEL_H + 60
    if note:
        draw.text((MARGIN_L, top - 20), note, fill=BLACK, font=_font(13))
    path = Path(path)
    image.save(path)
    return path


def greedy_series(parity_report: dict) -> dict[str, list[float]]:
    """Per-step max relative errors of the greedy and batch-decode cases of a
    run_parity report, one series per case and prompt."""
    out = {}
    for case in parity_report.get("cases", []):
        if case["case"] in ("greedy", "batch_decode"):
            out[f"{case['case']} p{case['prompt']}"] = [s["max_rel"] for s in case["steps"]]
    return out
