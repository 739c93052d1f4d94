"""`taming-dist report`: a run folder (or a folder of runs, such as runs/demo) -> one HTML file that
opens in a browser from disk, with no server and no network. See page.py for what it shows."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from taming_dist.atomic import write_atomic

from .page import page_html
from .run import Run, find_runs, read_images, read_run

__all__ = ["Run", "find_runs", "read_run", "write_report"]


def write_report(folder: str | Path, out: Optional[str | Path] = None, *, max_thumbnails: int = 48) -> Path:
    """Write the report of `folder` to `out` (default `folder/report.html`) and return its path.

    `folder` is a run folder, or a folder holding run folders (one page with a section per run,
    plus the images lying in `folder` itself). The file is replaced atomically, so a page open in
    a browser is never half written; rebuild it at any time, the run need not have ended."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist")
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"{folder} is neither a run folder (config.yaml, log.txt) nor a folder of runs")
    out = Path(out) if out is not None else folder / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = read_images(folder) if runs != [folder] else []
    # First stages before the transformers trained on them (the demo's order), then by name.
    runs = sorted((read_run(r) for r in runs), key=lambda r: (r.config.get("stage") != "vqgan", r.name))
    html = page_html(folder.resolve().name, runs, out.parent.resolve(), extra_images=extra,
                     max_thumbnails=max_thumbnails)
    return write_atomic(out, html)
