"""What a run folder holds, read for the report: config, metric rows, messages, image grids, checkpoints.

Reads only files (no wandb, no torch), so it works on a run that is still going (a half-written
last log line, a checkpoint folder still named `.tmp`) and on a folder copied from a cluster.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_IMAGE_NAME = re.compile(r"^(?P<kind>.+?)_(?P<step>\d+)$")  # images/recon_000500.png
_RESUMED = re.compile(r"^resumed from .* at step (?P<step>\d+)")


@dataclass
class Event:
    step: Optional[int]  # the step it refers to, or the last logged step before it
    kind: str  # resume | restart | stop | requeue | skipped | message
    text: str


@dataclass
class Image:
    path: Path
    kind: str  # recon, samples, ... (the name before _<step>)
    step: Optional[int]


@dataclass
class Checkpoint:
    path: Path
    step: Optional[int]
    complete: bool  # False for a step_N.tmp folder: being written, or left by a kill during a save
    latest: bool
    nbytes: int
    manifest: dict = field(default_factory=dict)


@dataclass
class Run:
    path: Path
    config_text: Optional[str]
    config: dict
    rows: list[dict]  # metric rows {"step", key: float}, by step; a re-logged step keeps its last row
    events: list[Event]
    images: list[Image]  # by kind, then step
    checkpoints: list[Checkpoint]  # by step
    model: Optional[Path]  # the inference folder written at the end
    unreadable_lines: int  # log lines that are not JSON (a half-written last line of a live run)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def total_steps(self) -> Optional[int]:
        steps = self.config.get("train", {}).get("steps") if isinstance(self.config.get("train"), dict) else None
        return steps if isinstance(steps, int) else None

    @property
    def last_step(self) -> Optional[int]:
        return self.rows[-1]["step"] if self.rows else None

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """key -> [(step, value)] of every logged metric, in first-logged order."""
        out: dict[str, list[tuple[int, float]]] = {}
        for row in self.rows:
            for k, v in row.items():
                if k != "step":
                    out.setdefault(k, []).append((row["step"], v))
        return out

    def status(self) -> str:
        if self.model is not None and (self.last_step or 0) >= (self.total_steps or 0):
            return "finished"
        starts_and_stops = [e for e in self.events if e.kind in ("stop", "resume", "restart")]
        if starts_and_stops and starts_and_stops[-1].kind == "stop":
            return f"stopped for requeue at step {starts_and_stops[-1].step}"
        return "running, or ended without a stop message"


def is_run_folder(path: Path) -> bool:
    return (path / "log.txt").is_file() or (path / "config.yaml").is_file()


def find_runs(path: Path) -> list[Path]:
    """`path` itself when it is a run folder, else the run folders directly inside it (runs/demo
    holds vqgan/ and transformer/)."""
    if is_run_folder(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and is_run_folder(p))


def read_log(path: Path) -> tuple[list[dict], list[Event], int]:
    """(metric rows by step, events, unreadable lines) of a log.txt."""
    by_step: dict[int, dict] = {}
    events: list[Event] = []
    unreadable, last, resumed = 0, None, False
    if not path.is_file():
        return [], [], 0
    with open(path, errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                unreadable += int(bool(line.strip()))
                continue
            if not isinstance(entry, dict):
                unreadable += 1
            elif "step" in entry:
                step = int(entry["step"])
                # A resumed run logs again the steps after its checkpoint; say so where the log
                # itself does not ("resumed from" is printed, not logged, by older versions).
                if last is not None and step <= last and not resumed:
                    events.append(Event(step - 1, "restart", f"the log restarts at step {step} after step {last}: "
                                                             f"resumed from a checkpoint, or started again"))
                by_step[step] = {"step": step, **{k: _number(v) for k, v in entry.items() if k != "step"}}
                last, resumed = step, False
            elif "message" in entry:
                events.append(_event(str(entry["message"]), last))
                resumed = resumed or events[-1].kind == "resume"
    return [by_step[s] for s in sorted(by_step)], events, unreadable


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _event(text: str, last_step: Optional[int]) -> Event:
    resumed = _RESUMED.match(text)
    if resumed:
        return Event(int(resumed["step"]), "resume", text)
    kind = ("stop" if text.startswith("stop signal") else "requeue" if "requeue" in text.lower()
            else "skipped" if "step skipped" in text else "message")
    return Event(last_step, kind, text)


def read_images(folder: Path) -> list[Image]:
    """The image files of a folder, grouped by kind (`recon_000500.png` is kind recon, step 500)."""
    if not folder.is_dir():
        return []
    images = []
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            m = _IMAGE_NAME.match(p.stem)
            images.append(Image(p, m["kind"], int(m["step"])) if m else Image(p, p.stem, None))
    return sorted(images, key=lambda im: (im.kind, im.step if im.step is not None else -1, im.path.name))


def read_checkpoints(folder: Path) -> list[Checkpoint]:
    if not folder.is_dir():
        return []
    latest_file = folder / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"step_(\d+)(\.tmp)?", p.name)
        if not (p.is_dir() and m):
            continue
        manifest = {}
        if (p / "manifest.json").is_file():
            try:
                manifest = json.loads((p / "manifest.json").read_text())
            except json.JSONDecodeError:
                manifest = {}
        nbytes = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        found.append(Checkpoint(p, int(manifest.get("step", m[1])), complete=not m[2], latest=p.name == latest,
                                nbytes=nbytes, manifest=manifest))
    return sorted(found, key=lambda c: (c.step, c.path.name))


def read_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    config_text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None
    try:
        config = yaml.safe_load(config_text) if config_text else {}
    except yaml.YAMLError:
        config = {}
    rows, events, unreadable = read_log(path / "log.txt")
    model = path / "model"
    return Run(path, config_text, config if isinstance(config, dict) else {}, rows, events,
               read_images(path / "images"), read_checkpoints(path / "checkpoints"),
               model if (model / "config.json").is_file() else None, unreadable)
