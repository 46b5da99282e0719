"""The demo's report: one self-contained HTML page a person can look at.

`render_report` writes `out_dir/report.html` with, in order: the metrics as tables, sample images
with their generated captions, VQA answers, retrieval examples, the loss curves as inline SVG line
charts, and heatmaps of which image patches each query attends to. Everything is embedded (PNG
images as base64 data URIs, CSS inline); the page needs no JavaScript and loads nothing.

`attention_maps` computes those heatmaps from a Q-Former: the cross-attention probabilities of
each query over the image's patch grid, averaged over heads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["attention_maps", "render_report"]

THUMB = 128  # displayed size of sample images, in pixels
SMALL_THUMB = 96  # retrieval thumbnails and attention heatmaps
HEATMAP_ALPHA = 0.6  # weight of the colour map over the image
CURVE_SKIP_KEYS = {"step", "lr", "samples_per_s"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
GOOD, BAD, NEUTRAL = "#1a9641", "#d7191c", "#9a9a9a"

# A viridis-like ramp: anchors of the matplotlib colour map, interpolated linearly.
_RAMP = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 74, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [110, 206, 88],
        [181, 222, 43],
        [253, 231, 37],
    ],
    dtype=np.float64,
)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1em 1.5em 3em; color: #222; line-height: 1.4; }
h1 { margin-bottom: .2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin: 1em 0 .4em; font-size: 1.05em; }
p.lead { color: #555; margin-top: 0; }
p.note { color: #777; font-style: italic; }
nav a { margin-right: 1em; }
table.metrics { border-collapse: collapse; margin: .3em 1.5em 1em 0; display: inline-table;
                vertical-align: top; font-size: .92em; }
table.metrics caption { text-align: left; font-weight: 600; padding-bottom: .2em; }
table.metrics td, table.metrics th { border: 1px solid #ddd; padding: .2em .6em; }
table.metrics th { background: #f4f4f4; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: monospace; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.card { width: 150px; font-size: .85em; border: 1px solid #e2e2e2; border-radius: 6px; padding: 8px;
        background: #fafafa; }
.card.good { border-left: 5px solid #1a9641; }
.card.bad { border-left: 5px solid #d7191c; }
.card img { display: block; margin: 0 auto 6px; }
img.px { image-rendering: pixelated; image-rendering: crisp-edges; }
.mark { font-weight: bold; }
.mark.good { color: #1a9641; } .mark.bad { color: #d7191c; }
.refs { color: #777; font-size: .9em; margin-top: 4px; }
.row { display: flex; align-items: flex-start; gap: 10px; margin-bottom: 14px; }
.row .query { width: 220px; font-size: .9em; flex: none; }
.thumb { text-align: center; font-size: .75em; color: #555; }
.thumb img { border: 4px solid #9a9a9a; border-radius: 3px; }
.thumb.hit img { border-color: #1a9641; } .thumb.miss img { border-color: #d7191c; }
.att { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; margin-bottom: 18px; }
.att figure { margin: 0; text-align: center; font-size: .78em; color: #444; }
.colorbar { display: inline-block; width: 160px; height: 10px; vertical-align: middle; margin: 0 .4em;
            background: linear-gradient(to right, rgb(68,1,84), rgb(49,104,142), rgb(31,158,137),
            rgb(110,206,88), rgb(253,231,37)); }
svg.chart { background: #fff; border: 1px solid #e2e2e2; margin: .3em 1em 1em 0; }
"""


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


def render_report(
    out_dir: Path,
    *,
    metrics: dict,
    captions: list[dict],
    vqa: list[dict],
    retrieval: list[dict],
    curves: dict[str, list[dict]],
    attention: list[dict],
    title: str = "qformer demo",
) -> Path:
    """Write `out_dir/report.html` and return its path.

    Image paths in the inputs may be absolute or relative to `out_dir` (PIL images and HWC uint8
    arrays are accepted too). Sections with no data are left out with a one-line note.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _ImageCache(out_dir)
    sections = [
        ("metrics", "Metrics", _metrics_section(metrics or {}), "No metrics were given."),
        ("captions", "Captions", _captions_section(captions or [], images), "No caption samples."),
        ("vqa", "Visual question answering", _vqa_section(vqa or [], images), "No VQA samples."),
        ("retrieval", "Retrieval", _retrieval_section(retrieval or [], images), "No retrieval examples."),
        ("curves", "Loss curves", _curves_section(curves or {}), "No training curves were recorded."),
        ("attention", "Query attention", _attention_section(attention or [], images),
         "No attention maps."),
    ]  # fmt: skip
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        (
            '<p class="lead">BLIP-2 (a Q-Former between a frozen vision tower and a frozen language '
            "model) trained on a synthetic world of coloured shapes. Below: the evaluation metrics, "
            "sample images with the captions and answers the model generated, image retrieval from "
            "captions, the training losses, and which image patches each learned query attends "
            "to.</p>"
        ),
    ]
    present = [(sid, name) for sid, name, body, _ in sections if body]
    if present:
        links = " ".join(f'<a href="#{sid}">{e(name)}</a>' for sid, name in present)
        parts.append(f"<nav>{links}</nav>")
    for sid, name, body, note in sections:
        if body:
            parts.append(f'<section id="{sid}"><h2>{e(name)}</h2>{body}</section>')
        else:
            parts.append(f'<p class="note omitted">{e(name)}: {e(note)}</p>')
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

_METRIC_ORDER = ["retrieval", "caption", "vqa", "ablation"]


def _fmt_value(v: Any) -> tuple[str, bool]:
    """Text of a metric value and whether it is a number."""
    if v is None:
        return "–", False
    if isinstance(v, bool):
        return str(v), False
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / torch scalars
        v = v.item()
    if isinstance(v, numbers.Integral):
        return str(int(v)), True
    if isinstance(v, numbers.Real):
        f = float(v)
        return (f"{f:.3f}" if math.isfinite(f) else str(f)), True
    if isinstance(v, str):
        return v, False
    try:
        text = json.dumps(v, default=str)
    except (TypeError, ValueError):
        text = str(v)
    return (text if len(text) <= 200 else text[:197] + "..."), False


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        if not d and prefix:
            return [(prefix, "{}")]
        rows: list[tuple[str, Any]] = []
        for k, v in d.items():
            rows += _flatten(v, f"{prefix} / {k}" if prefix else str(k))
        return rows
    return [(prefix, d)]


def _table(caption: str, rows: list[tuple[str, Any]], header: tuple[str, str] = ("metric", "value"),
           extra: Any = None) -> str:  # fmt: skip
    e = html.escape
    body = []
    for key, value in rows:
        text, is_num = _fmt_value(value)
        cells = f'<td class="{"num" if is_num else "txt"}">{e(text)}</td>'
        if extra is not None:
            cells += f'<td class="txt">{e(extra(value))}</td>'
        body.append(f"<tr><th>{e(key)}</th>{cells}</tr>")
    head = f"<tr><th>{e(header[0])}</th><th>{e(header[1])}</th>"
    head += "<th></th></tr>" if extra is not None else "</tr>"
    return (
        f'<table class="metrics"><caption>{e(caption)}</caption>'
        f"<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
    )


def _human_seconds(v: Any) -> str:
    try:
        s = float(v)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(s) or s < 60:
        return ""
    m, s = divmod(s, 60)
    if m < 60:
        return f"{int(m)} min {s:.0f} s"
    h, m = divmod(m, 60)
    return f"{int(h)} h {int(m)} min"


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return ""
    scalars = [(str(k), v) for k, v in metrics.items() if not isinstance(v, dict)]
    groups = [k for k in metrics if isinstance(metrics[k], dict)]
    ordered = [k for k in _METRIC_ORDER if k in groups]
    ordered += [k for k in groups if k not in ordered and k != "seconds"]
    tables = []
    if scalars:
        tables.append(_table("summary", scalars))
    for k in ordered:
        rows = _flatten(metrics[k])
        if rows:
            tables.append(_table(str(k), rows))
    if "seconds" in groups:
        rows = _flatten(metrics["seconds"])
        if rows:
            tables.append(_table("seconds", rows, ("step", "seconds"), extra=_human_seconds))
    return "\n".join(tables)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _ImageCache:
    """Loads images (path absolute or relative to the report's folder) once; makes thumbnails."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._images: dict[str, Image.Image | None] = {}
        self._uris: dict[tuple[str, int], str] = {}

    def load(self, src: Any) -> Image.Image | None:
        if isinstance(src, Image.Image):
            return src.convert("RGB")
        if isinstance(src, np.ndarray):
            arr = src
            if arr.dtype != np.uint8:
                arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            return Image.fromarray(arr).convert("RGB")
        if src is None:
            return None
        key = str(src)
        if key not in self._images:
            p = Path(key)
            if not p.is_absolute():
                p = self.root / p
            try:
                with Image.open(p) as im:
                    self._images[key] = im.convert("RGB")
            except (OSError, ValueError):
                self._images[key] = None
        return self._images[key]

    def tag(self, src: Any, size: int, cls: str = "px", alt: str = "") -> str:
        """An <img> of `src` scaled (NEAREST) to `size` pixels on its longer side."""
        key = (str(src), size) if isinstance(src, (str, Path)) else None
        uri = self._uris.get(key) if key else None
        if uri is None:
            img = self.load(src)
            if img is None:
                return (
                    f'<div style="width:{size}px;height:{size}px;background:#eee;color:#999;'
                    f'font-size:11px;display:flex;align-items:center;justify-content:center">'
                    f"missing image</div>"
                )
            uri = _png_uri(_scaled(img, size))
            if key:
                self._uris[key] = uri
        return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt)}">'


def _scaled(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = size / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.NEAREST)


# --------------------------------------------------------------------------------------------
# captions, VQA, retrieval
# --------------------------------------------------------------------------------------------


def _mark(ok: bool | None) -> tuple[str, str]:
    """(card class, marker html) for a known/unknown correctness."""
    if ok is None:
        return "", ""
    return ("good", '<span class="mark good">&#10003;</span> ') if ok else (
        "bad", '<span class="mark bad">&#10007;</span> ')  # fmt: skip


def _captions_section(captions: list[dict], images: _ImageCache) -> str:
    if not captions:
        return ""
    e = html.escape
    cards = []
    for item in captions:
        caption = str(item.get("caption", ""))
        cls, mark = _mark(item.get("correct"))
        refs = [str(r) for r in item.get("references") or []]
        refs_html = (
            f'<div class="refs">reference: {"<br>".join(e(r) for r in refs[:3])}</div>' if refs else ""
        )
        cards.append(
            f'<div class="card {cls}">{images.tag(item.get("image"), THUMB, alt=caption)}'
            f'<div class="caption">{mark}{e(caption)}</div>{refs_html}</div>'
        )
    known = [c.get("correct") for c in captions if c.get("correct") is not None]
    summary = (
        f'<p class="note">{sum(bool(k) for k in known)} of {len(known)} shown captions match a '
        f"reference (green &#10003; / red &#10007;).</p>"
        if known
        else ""
    )
    return summary + f'<div class="grid">{"".join(cards)}</div>'


def _norm_answer(s: Any) -> str:
    return " ".join(str(s).strip().lower().rstrip(".").split())


def _vqa_section(vqa: list[dict], images: _ImageCache) -> str:
    if not vqa:
        return ""
    e = html.escape
    cards, n_ok = [], 0
    for item in vqa:
        answer, truth = item.get("answer", ""), item.get("truth")
        ok = None if truth is None else _norm_answer(answer) == _norm_answer(truth)
        n_ok += bool(ok)
        cls, mark = _mark(ok)
        truth_html = "" if truth is None else f'<div class="refs">truth: {e(str(truth))}</div>'
        cards.append(
            f'<div class="card {cls}">{images.tag(item.get("image"), THUMB)}'
            f'<div><b>Q:</b> {e(str(item.get("question", "")))}</div>'
            f"<div><b>A:</b> {mark}{e(str(answer))}</div>{truth_html}</div>"
        )
    return (
        f'<p class="note">{n_ok} of {len(vqa)} shown answers are right (green &#10003; / red '
        f"&#10007;).</p>" + f'<div class="grid">{"".join(cards)}</div>'
    )


def _retrieval_section(retrieval: list[dict], images: _ImageCache) -> str:
    if not retrieval:
        return ""
    e = html.escape
    rows = []
    for item in retrieval:
        hits = list(item.get("hits") or [])
        thumbs = []
        for rank, src in enumerate(item.get("images") or [], start=1):
            hit = hits[rank - 1] if rank <= len(hits) else None
            cls = "" if hit is None else ("hit" if hit else "miss")
            label = "" if hit is None else (" &#10003;" if hit else " &#10007;")
            thumbs.append(
                f'<div class="thumb {cls}">{images.tag(src, SMALL_THUMB)}<div>#{rank}{label}</div></div>'
            )
        rows.append(
            f'<div class="row"><div class="query"><b>query:</b> {e(str(item.get("query", "")))}</div>'
            f'{"".join(thumbs)}</div>'
        )
    return (
        '<p class="note">Text-to-image retrieval: for each caption, the top 5 images by ITC '
        "similarity, best first; a green frame is an image the caption describes, red one it does "
        "not.</p>" + "".join(rows)
    )


# --------------------------------------------------------------------------------------------
# loss curves (inline SVG)
# --------------------------------------------------------------------------------------------


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    return None


def _nice_step(span: float, target: int = 6) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10 * mag


def _axis(lo: float, hi: float, integer: bool = False) -> tuple[float, float, list[float], float]:
    """Padded range and tick positions covering [lo, hi]; never a zero span."""
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = 1.0 if integer else (abs(lo) * 0.1 or 1.0)
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    if integer:
        step = max(1.0, round(step))
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    n = round((hi - lo) / step)
    return lo, hi, [lo + i * step for i in range(n + 1)], step


def _fmt_tick(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        v = 0.0
    if step >= 1 and float(v).is_integer():
        return f"{int(v)}" if abs(v) < 1e6 else f"{v:.3g}"
    exp = math.floor(math.log10(step))
    mantissa = round(step / 10**exp, 6)
    decimals = min(8, max(0, -exp + (1 if mantissa == 2.5 else 0)))
    return f"{v:.{decimals}f}"


def _svg_chart(name: str, points: list[dict]) -> str:
    e = html.escape
    keys: list[str] = []
    for p in points:
        for k, v in p.items():
            if k not in CURVE_SKIP_KEYS and k not in keys and _as_float(v) is not None:
                keys.append(k)
    series: dict[str, list[tuple[float, float]]] = {}
    for k in keys:
        pts = []
        for i, p in enumerate(points):
            x = _as_float(p.get("step", i))
            y = _as_float(p.get(k))
            if x is not None and y is not None:
                pts.append((x, y))
        if pts:
            series[k] = pts
    W, H, ml, mr, mt, mb = 640, 300, 62, 130, 18, 44
    pw, ph = W - ml - mr, H - mt - mb
    out = [
        (
            f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img" aria-label="{e(name)}">'
        ),
        f'<text x="{ml}" y="12" font-size="12" font-weight="bold">{e(name)}</text>',
    ]
    if not series:
        out.append(f'<text x="{ml + 10}" y="{mt + ph / 2}" font-size="12" fill="#777">no numeric '
                   f"values</text></svg>")  # fmt: skip
        return "".join(out)
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, xticks, xstep = _axis(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    y0, y1, yticks, ystep = _axis(min(ys), max(ys))

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + ph - (y - y0) / (y1 - y0) * ph

    font = 'font-size="10" fill="#444"'
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#eee"/>')
        label = _fmt_tick(t, ystep)
        out.append(f'<text x="{ml - 5}" y="{y + 3:.1f}" text-anchor="end" {font}>{label}</text>')
    for t in xticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{mt + ph}" x2="{x:.1f}" y2="{mt + ph + 4}" stroke="#444"/>')
        label = _fmt_tick(t, xstep)
        out.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" {font}>{label}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{ml + pw / 2}" y="{H - 6}" text-anchor="middle" {font}>step</text>')
    out.append(
        f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" {font} '
        f'transform="rotate(-90 14 {mt + ph / 2})">value</text>'
    )
    for i, (k, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        if len(pts) <= 20:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        ly = mt + 8 + 16 * i
        lx = ml + pw + 12
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{color}" stroke-width="3"/>')
        last = pts[-1][1]
        out.append(f'<text x="{ml + pw + 35}" y="{ly + 4}" font-size="11">{e(str(k))} ({last:.3g})</text>')
    out.append("</svg>")
    return "".join(out)


def _curves_section(curves: dict[str, list[dict]]) -> str:
    charts = [_svg_chart(str(name), list(points)) for name, points in (curves or {}).items() if points]
    if not charts:
        return ""
    return (
        '<p class="note">Training losses by optimisation step (the legend gives each one\'s last '
        "value).</p>" + "".join(f"<div>{c}</div>" for c in charts)
    )


# --------------------------------------------------------------------------------------------
# attention heatmaps
# --------------------------------------------------------------------------------------------


def _to_numpy(maps: Any) -> np.ndarray:
    if hasattr(maps, "detach"):  # torch tensor
        maps = maps.detach().float().cpu().numpy()
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"attention maps must be (queries, gh, gw), got shape {arr.shape}")
    return arr


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB through the viridis-like ramp."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(v).astype(int), len(_RAMP) - 2)
    f = (v - i)[..., None]
    return np.round(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def heatmap_overlay(image: Image.Image, amap: np.ndarray, size: int = SMALL_THUMB,
                    alpha: float = HEATMAP_ALPHA) -> Image.Image:  # fmt: skip
    """`amap` (gh, gw) min-max normalised, upsampled (NEAREST: one block per patch) to the image
    shown at `size` pixels, coloured and alpha-blended over it."""
    base = _scaled(image.convert("RGB"), size)
    lo, hi = float(np.min(amap)), float(np.max(amap))
    norm = (amap - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(amap)
    colour = Image.fromarray(colorize(norm)).resize(base.size, Image.NEAREST)
    return Image.blend(base, colour, alpha)


def _attention_section(attention: list[dict], images: _ImageCache) -> str:
    if not attention:
        return ""
    e = html.escape
    blocks = []
    for n, item in enumerate(attention):
        maps = _to_numpy(item.get("maps"))
        img = images.load(item.get("image"))
        if img is None:
            gh, gw = maps.shape[1:]
            img = Image.new("RGB", (gw, gh), (128, 128, 128))
        figs = [
            (
                f'<figure>{images.tag(item.get("image"), SMALL_THUMB)}<figcaption>image'
                f'{(" — " + e(str(item["caption"]))) if item.get("caption") else ""}</figcaption></figure>'
            )
        ]
        for k, amap in enumerate(maps):
            uri = _png_uri(heatmap_overlay(img, amap))
            figs.append(
                f'<figure><img class="px heatmap" src="{uri}" alt="query {k}">'
                f"<figcaption>query {k}<br>max {float(amap.max()):.3f}</figcaption></figure>"
            )
        blocks.append(f'<div class="att" id="attention-{n}">{"".join(figs)}</div>')
    return (
        '<p class="note">For each image, which patches each learned query attends to in the '
        "Q-Former's cross-attention (averaged over heads; each map normalised to its own range: "
        'low<span class="colorbar"></span>high; "max" is the largest weight on one patch).</p>'
        + "".join(blocks)
    )


# --------------------------------------------------------------------------------------------
# attention maps from a Q-Former
# --------------------------------------------------------------------------------------------


def attention_maps(qformer, image_tokens, *, layer: int | None = None, grid: tuple[int, int]):
    """Cross-attention probabilities of each query over the image patches: (b, q, gh, gw).

    qformer: a `qformer.model.QFormer`.
    image_tokens: (b, n, d_v), as the Q-Former receives them (after `ln_vision`), with
        n = prefix + gh * gw; the first n - gh * gw tokens (the class token) are dropped from the
        result, so a map sums to 1 minus the probability on those tokens.
    layer: index into `qformer.layers` of a layer with cross-attention; default the last such one.
    grid: (gh, gw), the patch grid.

    A forward hook on that layer's `cross_attn` captures the queries' hidden states entering it;
    the probabilities softmax(q k^T / sqrt(head_dim)) are recomputed from the module's own q and k
    projections and averaged over heads. Runs the model in eval mode (no dropout), without grad.
    """
    import torch

    layers_with_xattn = qformer.cross_attention_layers
    if not layers_with_xattn:
        raise ValueError("This Q-Former has no cross-attention layer.")
    if layer is None:
        layer = layers_with_xattn[-1]
    idx = layer + len(qformer.layers) if layer < 0 else layer
    if not 0 <= idx < len(qformer.layers) or qformer.layers[idx].cross_attn is None:
        raise ValueError(f"Layer {layer} has no cross-attention; choose one of {layers_with_xattn}.")
    gh, gw = grid
    if image_tokens.dim() != 3:
        raise ValueError(f"image_tokens must be (batch, tokens, width), got {tuple(image_tokens.shape)}")
    b, n, _ = image_tokens.shape
    prefix = n - gh * gw
    if prefix < 0:
        raise ValueError(f"{n} image tokens are fewer than the grid's {gh}x{gw} = {gh * gw} patches.")

    module = qformer.layers[idx].cross_attn
    captured: dict[str, Any] = {}

    def hook(mod, args, kwargs, output):
        captured["x"] = args[0] if args else kwargs["x"]

    handle = module.register_forward_hook(hook, with_kwargs=True)
    was_training = qformer.training
    qformer.eval()
    try:
        with torch.no_grad():
            qformer(image_embeds=image_tokens)
            x = captured["x"]  # (b, q, d)
            tokens = image_tokens.to(module.k.weight.dtype)
            h = module.num_heads
            q = module.q(x).view(b, x.shape[1], h, -1).transpose(1, 2)  # (b, h, q, hs)
            k = module.k(tokens).view(b, n, h, -1).transpose(1, 2)  # (b, h, n, hs)
            scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
            probs = scores.softmax(dim=-1).mean(dim=1)  # (b, q, n)
    finally:
        handle.remove()
        qformer.train(was_training)
    return probs[..., prefix:].reshape(b, probs.shape[1], gh, gw)
