"""Sweeps: a config file's `get_sweep(arg)` lists trials, each a dict of overrides.

    def get_sweep(arg=None):
      return [{"optimizer.lr": lr} for lr in (1e-3, 3e-3, 1e-2)]

`python -m jaxlm.launch --config FILE[:ARG] --sweep --workdir DIR [--config.KEY=V ...]` runs
every trial into DIR/<trial name>/, one after another, each as its own launcher process
(the command-line overrides apply to all trials; a trial's own come after them). A
trial may name itself with a "name" key; otherwise its name is its overrides, e.g.
`optimizer.lr=0.001`. Every trial's config is validated before the first one starts.
Running the sweep again skips finished trials and resumes unfinished ones from their
checkpoints. `--dry_run` prints the trials and their commands and runs nothing. With
`--tpu NAME` each trial is its own Cloud TPU job (jaxlm.tpu).

`tools/sweep_report.py DIR` collects the trials' final and best metrics into
sweep_report.md, sweep_report.csv and sweep_report.png (`report` here).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys

import ml_collections

from jaxlm import console, fileio
from jaxlm.config import load_module, set_key
from jaxlm.errors import ConfigError
from jaxlm.validate import config_errors as validate


def load_trials(config_spec: str) -> list[dict]:
  """The override dicts of FILE[:ARG]'s get_sweep(ARG)."""
  path, _, arg = config_spec.partition(":")
  module = load_module(path, "_jaxlm_sweep_config")
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"--sweep: {path} defines no get_sweep(arg) returning a list of "
                      f"override dicts")
  trials = module.get_sweep(arg or None)
  if not isinstance(trials, (list, tuple)) or not trials or not all(
      isinstance(t, dict) for t in trials):
    raise ConfigError(f"--sweep: {path}: get_sweep must return a non-empty list of dicts")
  return [dict(t) for t in trials]


def _value_text(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def override_flags(settings: dict) -> list[str]:
  """{"optimizer.lr": 0.001} -> ["--config.optimizer.lr=0.001"] (a trial's "name" left out)."""
  return [f"--config.{k}={_value_text(v)}" for k, v in settings.items() if k != "name"]


def trial_name(overrides: dict) -> str:
  """A folder name: the trial's "name", else its overrides as key=value joined by commas."""
  name = overrides.get("name") or ",".join(
      f"{k}={_value_text(v)}" for k, v in overrides.items() if k != "name")
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(name))
  if not name.strip("._") or len(name) > 200:
    raise ConfigError(f"--sweep: trial {overrides} makes no usable folder name; give it a "
                      f"short 'name'")
  return name


def apply(config, overrides: dict):
  """A copy of `config` with dotted-key overrides set; ConfigError naming a missing key."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    if key != "name":
      set_key(c, key, value)
  return c


def plan(config_spec: str, config, cli_overrides: dict, workdir: str, num_devices: int,
         num_processes: int = 1, extra_flags: tuple = (), ignore: tuple = ()) -> list[dict]:
  """Every trial's name, overrides, workdir and launcher command, each validated (but for
  problems of the keys in `ignore`: paths only another machine can check)."""
  trials, names, errors = [], set(), []
  for overrides in load_trials(config_spec):
    name = trial_name(overrides)
    if name in names:
      raise ConfigError(f"--sweep: two trials are named {name!r}")
    names.add(name)
    try:
      problems = validate(apply(config, overrides), num_devices, num_processes)
    except ConfigError as e:
      problems = [str(e)]
    errors += [f"sweep trial {name!r}: {p}" for p in problems
               if not (ignore and p.startswith(ignore))]
    trial_dir = os.path.join(workdir, name)
    flags = override_flags({**cli_overrides, **overrides})
    cmd = [sys.executable, "-m", "jaxlm.launch", "--config", config_spec,
           "--workdir", trial_dir, *extra_flags, *flags]
    trials.append({"name": name, "overrides": overrides, "workdir": trial_dir, "command": cmd,
                   "flags": flags})
  if errors:
    raise ConfigError("; ".join(errors))
  return trials


def finished(trial_dir: str) -> bool:
  path = os.path.join(trial_dir, "summary.json")
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    return bool(json.load(f).get("finished"))


def run(trials: list[dict], workdir: str, dry_run: bool = False) -> int:
  """Run the trials one after another (finished ones skipped); the number that failed."""
  if dry_run:
    for t in trials:
      console.info(f"{t['name']}: {shlex.join(t['command'])}")
    return 0
  os.makedirs(workdir, exist_ok=True)
  failed = 0
  for i, t in enumerate(trials, 1):
    if finished(t["workdir"]):
      console.info(f"[{i}/{len(trials)}] {t['name']}: finished earlier, skipped")
      continue
    console.info(f"[{i}/{len(trials)}] {t['name']}: {shlex.join(t['command'])}")
    code = subprocess.call(t["command"])
    if code:
      failed += 1
      console.info(f"[{i}/{len(trials)}] {t['name']}: exit status {code}")
    t["exit_status"] = code
  fileio.atomic_write_json(os.path.join(workdir, "sweep.json"), [
      {"name": t["name"], "overrides": t["overrides"], "workdir": t["workdir"],
       "command": shlex.join(t["command"]), "exit_status": t.get("exit_status")}
      for t in trials], default=str)
  return failed


# ---------------------------------------------------------------------------------------
# Report


def _records(trial_dir: str) -> list[dict]:
  path = os.path.join(trial_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def collect(directory: str, metric: str) -> list[dict]:
  """One row per trial folder of `directory` (a folder with summary.json or
  metrics.jsonl): its overrides, steps, finished, final and best `metric`."""
  overrides = {}
  sweep_file = os.path.join(directory, "sweep.json")
  if os.path.isfile(sweep_file):
    with open(sweep_file, encoding="utf-8") as f:
      overrides = {t["name"]: t["overrides"] for t in json.load(f)}
  rows = []
  for name in sorted(os.listdir(directory)):
    trial_dir = os.path.join(directory, name)
    records = _records(trial_dir)
    summary_path = os.path.join(trial_dir, "summary.json")
    summary = {}
    if os.path.isfile(summary_path):
      with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    if not records and not summary:
      continue
    values = [(r["step"], r[metric]) for r in records
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    final = summary.get("metrics", {}).get(metric, values[-1][1] if values else None)
    rows.append({"trial": name, "overrides": overrides.get(name, {}),
                 "step": summary.get("step", max((r.get("step", 0) for r in records), default=0)),
                 "finished": bool(summary.get("finished")), "final": final,
                 "values": values})
  return rows


def report(directory: str, metric: str = "eval_loss", mode: str = "min") -> list[dict]:
  """sweep_report.md / .csv / .png in `directory`, trials sorted by their best `metric`
  (lowest first with mode min); returns the rows."""
  rows = collect(directory, metric)
  if not rows:
    raise ConfigError(f"{directory}: no trial folders (with metrics.jsonl or summary.json)")
  pick = min if mode == "min" else max
  for r in rows:
    r["best"], r["best_step"] = (pick(r["values"], key=lambda v: v[1])[::-1] if r["values"]
                                 else (None, None))
  sign = 1 if mode == "min" else -1
  rows.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0.0)))
  fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
  lines = [f"# Sweep: {os.path.abspath(directory)}", "",
           f"Sorted by the best `{metric}` ({mode}).", "",
           f"| rank | trial | overrides | steps | finished | best {metric} | at step | final {metric} |",
           "|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(rows, 1):
    o = ", ".join(f"{k}={_value_text(v)}" for k, v in r["overrides"].items() if k != "name")
    lines.append(f"| {i} | {r['trial']} | {o} | {r['step']} | {'yes' if r['finished'] else 'no'} "
                 f"| {fmt(r['best'])} | {r['best_step'] or ''} | {fmt(r['final'])} |")
  fileio.atomic_write(os.path.join(directory, "sweep_report.md"), "\n".join(lines) + "\n")
  table = io.StringIO(newline="")
  w = csv.writer(table)
  w.writerow(["rank", "trial", "overrides", "steps", "finished", f"best_{metric}",
              "best_step", f"final_{metric}"])
  for i, r in enumerate(rows, 1):
    w.writerow([i, r["trial"], json.dumps(r["overrides"], default=str), r["step"],
                r["finished"], r["best"], r["best_step"], r["final"]])
  fileio.atomic_write(os.path.join(directory, "sweep_report.csv"), table.getvalue())
  _plot(rows, metric, os.path.join(directory, "sweep_report.png"))
  return rows


def _plot(rows, metric: str, path: str):
  import matplotlib  # lazy: only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: only when plotting
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    if r["values"]:
      steps, values = zip(*r["values"])
      ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=r["trial"])
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} per trial")
  if any(r["values"] for r in rows):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
