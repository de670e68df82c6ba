"""A loss plot as PNG, drawn with Pillow (no plotting library needed on a training machine)."""

from __future__ import annotations

import os
from pathlib import Path

SERIES = (("loss", (31, 119, 180), "train loss"), ("eval_loss", (214, 39, 40), "eval loss"))


def render_loss_png(metrics: list[dict], path: Path, size: tuple[int, int] = (800, 450)) -> Path:
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = {key: [(m["step"], m[key]) for m in metrics if m.get(key) is not None] for key, _, _ in SERIES}
    values = [v for series in points.values() for _, v in series]
    steps = [s for series in points.values() for s, _ in series]
    draw.rectangle([left, top, width - right, height - bottom], outline=(180, 180, 180))
    if values:
        low, high = min(values), max(values)
        high = high if high > low else low + 1.0
        last = max(steps) if max(steps) > 0 else 1
        scale_x = lambda s: left + (width - left - right) * s / last  # noqa: E731
        scale_y = lambda v: height - bottom - (height - top - bottom) * (v - low) / (high - low)  # noqa: E731
        for key, colour, label in SERIES:
            line = [(scale_x(s), scale_y(v)) for s, v in points[key]]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for x, y in line[-1:] if key == "loss" else line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((5, top), f"{high:.3f}", fill="black")
        draw.text((5, height - bottom - 10), f"{low:.3f}", fill="black")
        draw.text((width - right - 60, height - bottom + 8), f"step {last}", fill="black")
    drawn = [(colour, label) for key, colour, label in SERIES if points[key]]  # no legend for a series not drawn
    for i, (colour, label) in enumerate(drawn):
        draw.text((left + 10 + 120 * i, 8), label, fill=colour)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")  # written aside and renamed: a crash never leaves half a PNG
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path
