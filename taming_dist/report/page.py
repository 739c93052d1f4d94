"""The report page: one self-contained HTML file (inline SVG curves, images as data URIs, no script).

Each run gets: a summary (status, step, ETA, latest checkpoint), its curves grouped as losses,
codebook, optimisation, throughput (MFU among them when logged), memory and data, with resumes
and restarts marked; the newest image grid of each kind at full size and the earlier ones as
thumbnails linking to the files beside the report; its checkpoints; the events of log.txt
(resumes, stops for requeue, requeues, skipped steps); and its config.
"""
from __future__ import annotations

import base64
import io
import os
import time
from html import escape
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .run import Image, Run
from .svg import line_chart

# (section, which keys, line colour); a key goes to the first group that takes it.
GROUPS = [
    ("Losses", lambda k: "loss" in k or k in ("nll", "l1", "mse", "logits_real", "logits_fake", "d_weight",
                                              "disc_factor"),
     "#d62728"),
    ("Codebook", lambda k: k in ("usage", "perplexity") or "codebook" in k, "#2ca02c"),
    ("Optimisation", lambda k: k.startswith("lr") or "grad_norm" in k or "skipped" in k, "#9467bd"),
    ("Throughput", lambda k: "_per_s" in k or k in ("step_s", "data_wait_frac", "mfu", "eta_s"), "#1f77b4"),
    ("Memory", lambda k: "mem" in k or "rss" in k, "#8c564b"),
    ("Data", lambda k: k.startswith("data/"), "#7f7f7f"),
    ("Other", lambda k: True, "#17becf"),
]
THUMBNAIL_SIDE = 256
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 24px 40px; color: #222; background: #fff; }
h1 { margin: 16px 0 4px; } h2 { border-bottom: 1px solid #ccc; margin-top: 32px; } h3 { margin: 22px 0 6px; }
h4 { margin: 14px 0 6px; color: #444; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
.charts, .thumbs { display: flex; flex-wrap: wrap; gap: 8px; }
svg.chart { background: #fafafa; border: 1px solid #ddd; }
svg .title { font-size: 12px; font-weight: 600; fill: #222; } svg .tick, svg .note { font-size: 10px; fill: #666; }
svg .frame { fill: none; stroke: #bbb; } svg .grid { stroke: #e4e4e4; }
svg .mark { stroke: #e377c2; stroke-dasharray: 4 3; stroke-width: 1.5; }
figure { margin: 0 0 8px; } figcaption { font-size: 12px; color: #555; }
figure.latest img { width: 100%; max-width: 768px; image-rendering: pixelated; border: 1px solid #ddd; }
.thumbs img { width: 180px; image-rendering: pixelated; border: 1px solid #ddd; }
.muted { color: #777; } pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
.ev-resume, .ev-restart { color: #1f6fb4; } .ev-stop, .ev-requeue { color: #b45f06; } .ev-skipped { color: #b00; }
nav a { margin-right: 12px; }
"""


def _data_uri(path: Path, max_side: Optional[int] = None) -> Optional[str]:
    """The image as a data URI (shrunk to `max_side` when larger), or None when it cannot be read
    (an image still being written by a live run)."""
    from PIL import Image as PILImage

    try:
        data = path.read_bytes()
        mime = _MIME.get(path.suffix.lower(), "image/png")
        with PILImage.open(io.BytesIO(data)) as im:
            if max_side and max(im.size) > max_side:
                im.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                data, mime = buf.getvalue(), "image/png"
            else:
                im.verify()
    except Exception:  # a truncated or missing file: shown as unreadable, never a failed report
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _figure(image: Image, out_dir: Path, cls: str, max_side: Optional[int]) -> str:
    rel = _rel(image.path, out_dir)
    uri = _data_uri(image.path, max_side)
    caption = escape(f"{image.kind}, step {image.step}" if image.step is not None else image.path.name)
    body = (f'<a href="{escape(rel)}"><img src="{uri}" alt="{escape(image.path.name)}"></a>' if uri
            else '<span class="muted">unreadable (being written?)</span>')
    return f'<figure class="{cls}" data-image="{escape(rel)}">{body}<figcaption>{caption}</figcaption></figure>'


def images_html(images: list[Image], out_dir: Path, max_thumbnails: int) -> str:
    """Per kind: the newest image at full size, then up to `max_thumbnails` earlier ones (evenly
    spaced, the first included) as thumbnails, and links to the rest."""
    if not images:
        return '<p class="muted">no images yet</p>'
    parts = []
    for kind in dict.fromkeys(im.kind for im in images):
        mine = [im for im in images if im.kind == kind]
        newest, earlier = mine[-1], mine[:-1][::-1]
        stride = max(1.0, len(earlier) / max(1, max_thumbnails))
        keep = {int(i * stride) for i in range(min(len(earlier), max_thumbnails))}
        parts.append(f"<h4>{escape(kind)}</h4>" + _figure(newest, out_dir, "latest", None))
        if earlier:
            thumbs = "".join(_figure(im, out_dir, "thumb", THUMBNAIL_SIDE) for i, im in enumerate(earlier) if i in keep)
            rels = [escape(_rel(im.path, out_dir)) for im in earlier]
            links = ", ".join(f'<a href="{rels[i]}" data-image="{rels[i]}">{im.step}</a>'
                              for i, im in enumerate(earlier) if i not in keep)
            parts.append(f'<p class="muted">earlier, newest first</p><div class="thumbs">{thumbs}</div>'
                         + (f'<p class="muted">more, by step: {links}</p>' if links else ""))
    return "".join(parts)


def curves_html(run: Run) -> str:
    series = run.series()
    if not series:
        return '<p class="muted">no metrics logged yet</p>'
    marks = [(e.step, e.text) for e in run.events if e.kind in ("resume", "restart") and e.step is not None]
    grouped: dict[str, list[str]] = {}
    for key in series:
        title, _, color = next(g for g in GROUPS if g[1](key))
        grouped.setdefault(title, []).append(line_chart(key, series[key], marks=marks, color=color))
    return "".join(f'<h4>{escape(title)}</h4><div class="charts">{"".join(grouped[title])}</div>'
                   for title, _, _ in GROUPS if title in grouped)


def _size(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"


def checkpoints_html(run: Run) -> str:
    if not run.checkpoints:
        return '<p class="muted">no checkpoints yet</p>'
    rows = []
    for c in run.checkpoints:
        m = c.manifest
        state = "latest" if c.latest else "" if c.complete else "incomplete (being written, or cut by a kill)"
        rows.append(f"<tr><td>{c.step}</td><td>{escape(c.path.name)}</td><td>{escape(str(m.get('engine', '?')))}"
                    f"</td><td>{escape(str(m.get('world_size', '?')))}</td><td>{escape(', '.join(m.get('units', [])))}"
                    f"</td><td>{_size(c.nbytes)}</td><td>{state}</td></tr>")
    return ("<table><tr><th>step</th><th>folder</th><th>engine</th><th>world size</th><th>units</th><th>size</th>"
            f"<th></th></tr>{''.join(rows)}</table>")


def events_html(run: Run) -> str:
    if not run.events:
        return '<p class="muted">no messages in log.txt</p>'
    rows = "".join(f'<tr class="ev-{e.kind}"><td>{e.step if e.step is not None else ""}</td><td>{e.kind}</td>'
                   f"<td>{escape(e.text)}</td></tr>" for e in run.events)
    return f"<table><tr><th>step</th><th>kind</th><th>message</th></tr>{rows}</table>"


def summary_html(run: Run) -> str:
    last = run.rows[-1] if run.rows else {}
    latest = next((c for c in reversed(run.checkpoints) if c.latest), None)
    rows = [("status", run.status()),
            ("step", f"{run.last_step if run.last_step is not None else '-'} / {run.total_steps or '?'}"),
            ("stage, engine", f"{run.config.get('stage', '?')}, {(run.config.get('engine') or {}).get('kind', '?')}")]
    if "eta_s" in last and run.status() != "finished":
        rows.append(("ETA at the last log line", tqdm.format_interval(last["eta_s"])))
    if (run.path / "log.txt").is_file():
        mtime = (run.path / "log.txt").stat().st_mtime
        rows.append(("log.txt last written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mtime))))
    rows.append(("latest checkpoint", f"step {latest.step} ({latest.path.name})" if latest else "none"))
    rows.append(("model folder", "model/ (written at the end)" if run.model else "not yet"))
    if run.unreadable_lines:
        rows.append(("unreadable log lines", f"{run.unreadable_lines} (a line being written by a live run)"))
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows) + "</table>"


def run_html(run: Run, out_dir: Path, max_thumbnails: int) -> str:
    config = (f"<details><summary>config.yaml</summary><pre>{escape(run.config_text)}</pre></details>"
              if run.config_text else '<p class="muted">no config.yaml yet</p>')
    return (f'<section class="run" id="run-{escape(run.name)}"><h2>{escape(run.name)}</h2>'
            f'<p class="muted">{escape(str(run.path.resolve()))}</p>{summary_html(run)}'
            f"<h3>Curves</h3>{curves_html(run)}<h3>Images</h3>"
            f"{images_html(run.images, out_dir, max_thumbnails)}<h3>Checkpoints</h3>{checkpoints_html(run)}"
            f"<h3>Events (log.txt)</h3>{events_html(run)}<h3>Config</h3>{config}</section>")


def page_html(title: str, runs: list[Run], out_dir: Path, *, extra_images: list[Image] = (),
              max_thumbnails: int = 48) -> str:
    """The whole page: `runs` in order, and images of the folder above them (runs/demo/samples.png)."""
    nav = "".join(f'<a href="#run-{escape(r.name)}">{escape(r.name)}</a>' for r in runs) if len(runs) > 1 else ""
    extra = f"<h2>Images</h2>{images_html(list(extra_images), out_dir, max_thumbnails)}" if extra_images else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    body = "".join(run_html(r, out_dir, max_thumbnails) for r in runs)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f'<body><h1>{escape(title)}</h1><p class="muted">taming-dist report, written {stamp}; rebuild it with '
            f'<code>taming-dist report</code> to see newer steps</p><nav>{nav}</nav>{extra}{body}</body></html>')

