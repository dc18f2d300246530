"""PNG plots of runs: loss curves per stage, reward and KL during RL, accuracy per stage.

A run is a workdir: a single training run (its metrics.jsonl) or a pipeline (one
subfolder per stage, each with metrics.jsonl and eval/eval.json). Several runs overlay,
one line (or bar) each. Used by the pipeline's report and by tools/plot.py.
"""

from __future__ import annotations

import io
import json
import os

from jaxlm import fileio


STAGE_LABELS = {"pretrain": "base", "sft": "sft", "reward": "reward", "dpo": "dpo", "rl": "rl"}


def read_metrics(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows


def find_stages(workdir: str) -> dict[str, str]:
  """{stage name: its folder} for the workdir itself (a single run, name "") and each
  subfolder holding metrics.jsonl, in pipeline order first."""
  out = {}
  if os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
    out[""] = workdir
  subs = sorted(d for d in os.listdir(workdir)
                if os.path.isfile(os.path.join(workdir, d, "metrics.jsonl")))
  order = list(STAGE_LABELS)
  for d in sorted(subs, key=lambda d: (order.index(d) if d in order else len(order), d)):
    out[d] = os.path.join(workdir, d)
  return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
  import matplotlib  # lazy: only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: only when plotting
  return plt


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  fileio.atomic_write(path, png.getvalue())
  return path


def objective(folder: str) -> tuple[str, str]:
  """(metric key, panel title) of what a stage's training optimizes, from its
  config.json: its loss, named; for RL the reward, since the policy-gradient surrogate's
  value says little about progress."""
  config = fileio.read_json(os.path.join(folder, "config.json"), optional=True) or {}
  task = config.get("task", "")
  if task in ("grpo", "ppo"):
    return "reward", f"{task.upper()}: reward per rollout (smoothed)"
  titles = {"pretrain": "next-token cross-entropy", "sft": "cross-entropy on responses",
            "reward": "Bradley-Terry loss on pairs",
            "dpo": f"DPO loss ({config.get('dpo', {}).get('loss', 'sigmoid')})"}
  return "loss", titles.get(task, "loss")


def smoothed(values: list[float], frac: float = 0.1) -> list[float]:
  """A trailing mean over about `frac` of the points (at least 1)."""
  window = max(1, round(len(values) * frac))
  out, total = [], 0.0
  for i, v in enumerate(values):
    total += v - (values[i - window] if i >= window else 0.0)
    out.append(total / min(i + 1, window))
  return out


def plot_losses(runs: dict[str, str], path: str) -> str | None:
  """Training (solid) and held-out (dashed) loss per stage, one panel per stage, titled
  with the stage's objective; an RL stage's panel is its reward, smoothed over the raw
  series drawn faint."""
  stages = {label: find_stages(w) for label, w in runs.items()}
  names = list(dict.fromkeys(n for s in stages.values() for n in s))
  if not names:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
  for ax, name in zip(axes[0], names):
    for i, (label, found) in enumerate(stages.items()):
      if name not in found:
        continue
      rows = read_metrics(os.path.join(found[name], "metrics.jsonl"))
      color = f"C{i}"
      key, title = objective(found[name])
      steps, values = _series(rows, key)
      if key == "reward":
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        values = smoothed(values)
      ax.plot(steps, values, color=color, label=label if len(runs) > 1 else "train")
      steps, values = _series(rows, "eval_loss")
      if steps:
        ax.plot(steps, values, "--o", color=color, markersize=3,
                label=f"{label} held out" if len(runs) > 1 else "held out")
    ax.set_title(f"{STAGE_LABELS.get(name, name or 'run')}: {title}", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  return _save(plt, fig, path)


def plot_rl(runs: dict[str, str], path: str) -> str | None:
  """Reward and KL to the reference per step of RL runs (a pipeline's rl/ stage)."""
  found = {}
  for label, w in runs.items():
    for name, folder in find_stages(w).items():
      rows = read_metrics(os.path.join(folder, "metrics.jsonl"))
      if any("reward" in r for r in rows):
        found[f"{label} {name}".strip()] = rows
  if not found:
    return None
  plt = _pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.0))
  for i, (label, rows) in enumerate(found.items()):
    steps, values = _series(rows, "reward")
    a.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)  # raw, faint
    a.plot(steps, smoothed(values), color=f"C{i}", label=label)
    b.plot(*_series(rows, "objective/kl"), color=f"C{i}", label=label)
  a.set_title("reward (smoothed; raw faint)")
  b.set_title("KL to the reference (per token)")
  for ax in (a, b):
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  return _save(plt, fig, path)


def stage_metrics(workdir: str) -> dict[str, dict]:
  """{stage label: eval metrics} from each stage's eval/eval.json."""
  out = {}
  for name, label in STAGE_LABELS.items():
    path = os.path.join(workdir, name, "eval", "eval.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        out[label] = json.load(f)["metrics"]
  return out


def plot_accuracy(runs: dict[str, str], path: str,
                  keys=("task_accuracy", "task_accuracy_sampled")) -> str | None:
  """Task accuracy per policy stage (greedy and sampled), bars side by side per run."""
  per_run = {label: stage_metrics(w) for label, w in runs.items()}
  stages = [s for s in STAGE_LABELS.values()
            if any(keys[0] in m.get(s, {}) for m in per_run.values())]
  if not stages:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.4 * len(stages) * max(len(runs), 1) + 2, 3.2))
  bars = [(label, key) for label in per_run for key in keys]
  width = 0.8 / len(bars)
  for j, (label, key) in enumerate(bars):
    have = [(i, per_run[label][s][key]) for i, s in enumerate(stages)
            if key in per_run[label].get(s, {})]  # a metric a stage lacks is no bar
    if not have:
      continue
    xs = [i + (j - (len(bars) - 1) / 2) * width for i, _ in have]
    values = [v for _, v in have]
    name = key.replace("task_accuracy_sampled", "sampled").replace("task_accuracy", "greedy")
    ax.bar(xs, values, width, label=f"{label} {name}".strip(), color=f"C{j}")
  ax.set_xticks(range(len(stages)), stages)
  ax.set_ylim(0, 1)
  ax.set_ylabel("task accuracy (strict)")
  ax.legend(fontsize=7)
  return _save(plt, fig, path)


def plot_all(runs: dict[str, str], out_dir: str) -> list[str]:
  """Every plot that the runs have data for, into `out_dir`; the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  made = [plot_losses(runs, os.path.join(out_dir, "loss.png")),
          plot_rl(runs, os.path.join(out_dir, "rl.png")),
          plot_accuracy(runs, os.path.join(out_dir, "accuracy.png"))]
  return [p for p in made if p]
