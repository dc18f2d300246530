"""The pipeline's report card: report.md, report.json and plots/ in its workdir.

report.json holds the same numbers as report.md:

    {"environment": {...}, "total_seconds": ..., "cost": {...},
     "stages": {"base": {metric: value, ...}, "sft": ..., "reward": ..., "dpo": ..., "rl": ...}}

Each stage's object has its evaluation's metrics by name (task_accuracy, perplexity,
pairwise_accuracy, win_rate, kl_to_reference, ...) and its run's `steps`, `tokens`,
`train_seconds`, `eval_seconds`, `train_loss` and `train_flops`. A language-model stage
also has `task_accuracy_se` (binomial standard error), and from the second on
`task_accuracy_gain` over the stage before with its paired standard error
(`task_accuracy_gain_se`), from the two evaluations' answers to the same problems.
With `eval.lm_eval_tasks`, lm-evaluation-harness's numbers are there as
`lm_eval/TASK/METRIC` (e.g. `lm_eval/arc_easy/acc,none`), rows of report.md's table too.
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
import numpy as np

from jaxlm import console, fileio, model, plots
from jaxlm.config import model_config


REPORT_MD = "report.md"
REPORT_JSON = "report.json"
# Rows of the metrics table, in order: (key, what it is).
ROWS = (
    ("task_accuracy", "task accuracy, greedy (strict `####` match)"),
    ("task_accuracy_se", "its standard error"),
    ("task_accuracy_gain", "gain over the stage before (same problems)"),
    ("task_accuracy_gain_se", "the gain's paired standard error"),
    ("task_accuracy_sampled", "task accuracy, sampled"),
    ("task_accuracy_flexible", "task accuracy, greedy (last number)"),
    ("well_formed", "answers with a `####` line"),
    ("perplexity", "held-out perplexity"),
    ("pairwise_accuracy", "reward model pairwise accuracy"),
    ("reward_margin", "reward model mean margin"),
    ("reward_mean", "reward model score of greedy answers"),
    ("win_rate", "win rate over the stage it started from (reward model)"),
    ("kl_to_reference", "KL to the SFT model (nats per answer)"),
    ("train_loss", "final training loss (each stage's own objective)"),
)



def _record(path: str) -> dict | None:
  """A run's JSON record, or None when it is missing or cut short (not written yet)."""
  return fileio.read_json(path, optional=True)

def _train_flops(stage_dir: str, tokens: int) -> float:
  """Training FLOPs of a run: PaLM-style per-token FLOPs of its model x tokens."""
  run = _record(os.path.join(stage_dir, "config.json")) or {}
  if "model" not in run:
    return 0.0
  cfg = model_config("tiny", **ml_collections.ConfigDict(run["model"]).to_dict())
  return model.flops_per_token(cfg, run.get("data", {}).get("seq_len", 0)) * tokens


def collect(workdir: str) -> dict:
  """Every finished stage's numbers, by report name."""
  stages = {}
  for name, label in plots.STAGE_LABELS.items():
    d = os.path.join(workdir, name)
    summary = _record(os.path.join(d, "summary.json"))
    if summary is None:
      continue
    ev = _record(os.path.join(d, "eval", "eval.json")) or {"metrics": {}, "samples": []}
    tokens = int(summary["step"] * summary.get("tokens_per_step", 0))
    s = dict(ev["metrics"])
    for task, values in (s.pop("lm_eval", None) or {}).items():  # lm-evaluation-harness's
      s.update({f"lm_eval/{task}/{k}": v for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    s.update(steps=summary["step"], tokens=tokens,
             train_seconds=(_record(os.path.join(d, "stage.json")) or {}).get("seconds"),
             eval_seconds=ev.get("seconds"), train_flops=_train_flops(d, tokens),
             train_loss=summary.get("metrics", {}).get("loss"))
    s["samples"] = ev.get("samples", [])
    s["_correct"] = _correct(os.path.join(d, "eval", "samples.jsonl"))
    stages[label] = s
  _add_gains(stages)
  for s in stages.values():
    s.pop("_correct")
  return stages


def _correct(path: str) -> dict:
  """prompt -> whether its greedy answer was right, from an evaluation's samples.jsonl."""
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return {r["prompt"]: bool(r["correct"]) for r in map(json.loads, f) if "correct" in r}


def _add_gains(stages: dict):
  """Each language-model stage's `task_accuracy_se` (binomial), and its
  `task_accuracy_gain` over the language-model stage before it with the gain's paired
  standard error (`task_accuracy_gain_se`: the standard error of the mean per-problem
  difference, on the problems both answered)."""
  before = None
  for s in stages.values():
    correct = s["_correct"]
    if not correct:
      continue
    p, n = float(np.mean(list(correct.values()))), len(correct)
    s["task_accuracy_se"] = math.sqrt(p * (1 - p) / n)
    if before is not None:
      shared = [k for k in correct if k in before]
      if len(shared) > 1:
        d = np.array([float(correct[k]) - float(before[k]) for k in shared])
        s["task_accuracy_gain"] = float(d.mean())
        s["task_accuracy_gain_se"] = float(d.std(ddof=1) / math.sqrt(len(d)))
    before = correct


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def _seconds(v) -> str:
  return "" if v is None else f"{v:.0f} s"


def write(config, workdir: str) -> dict:
  """Write report.md, report.json and plots/ for the pipeline in `workdir`."""
  stages = collect(workdir)
  tok = _record(os.path.join(workdir, "tokenizer", "stage.json")) or {}
  seconds = (tok.get("seconds") or 0.0) + sum((s["train_seconds"] or 0.0) + (s["eval_seconds"] or 0.0)
                                              for s in stages.values())
  r = config.report
  flops = sum(s["train_flops"] for s in stages.values())
  accel_hours = flops / (r.accelerator_tflops * 1e12 * r.accelerator_mfu) / 3600
  cost = {"this_run_hours": seconds / 3600, "cpu_vm": r.cpu_vm,
          "cpu_vm_price_per_hour": r.cpu_vm_price, "cpu_vm_cost": seconds / 3600 * r.cpu_vm_price,
          "train_flops": flops, "accelerator": r.accelerator,
          "accelerator_price_per_hour": r.accelerator_price, "accelerator_mfu": r.accelerator_mfu,
          "accelerator_hours": accel_hours, "accelerator_cost": accel_hours * r.accelerator_price}
  env = console.environment()
  result = {"environment": env, "total_seconds": seconds, "cost": cost,
            "stages": {k: {m: v for m, v in s.items() if m != "samples"} for k, s in stages.items()}}
  if jax.process_index() != 0:
    return result
  plot_files = plots.plot_all({"": workdir}, os.path.join(workdir, "plots"))
  fileio.atomic_write_json(os.path.join(workdir, REPORT_JSON), result)
  fileio.atomic_write(os.path.join(workdir, REPORT_MD),
                      _markdown(result, stages, plot_files, workdir, tok, r.samples))
  return result


def shown(samples: list[dict], n: int) -> list[dict]:
  """Up to `n` samples, right and wrong answers in turn while both last (in their order),
  so the card shows what a stage gets wrong as well as what it gets right."""
  right = [x for x in samples if x.get("correct")]
  wrong = [x for x in samples if not x.get("correct")]
  out = []
  while len(out) < n and (right or wrong):
    for group in (right, wrong):
      if group and len(out) < n:
        out.append(group.pop(0))
  return out


def notes(stages: dict) -> list[str]:
  """One line for each metric that moves for a reason the stages explain."""
  out = []
  ppl = [(n, s["perplexity"]) for n, s in stages.items() if s.get("perplexity") is not None]
  if any(b > a for (_, a), (_, b) in zip(ppl, ppl[1:])):
    out.append("- Held-out perplexity is on pretraining text: it rises once a stage trains "
               "on chat answers instead (SFT and after), as expected.")
  return ["", *out] if out else []


def _markdown(result, stages, plot_files, workdir, tok, n_samples) -> str:
  env, cost = result["environment"], result["cost"]
  names = list(stages)
  out = ["# jaxlm report card", ""]
  out += ["| environment | |", "|---|---|"]
  out += [f"| {k} | {_fmt(v)} |" for k, v in env.items()]
  out += [f"| total time | {_seconds(result['total_seconds'])} |", ""]
  out += ["## Stages", "", "| stage | steps | tokens | training | evaluation | headline |",
          "|---|---|---|---|---|---|"]
  if tok:
    out.append(f"| tokenizer | | | {_seconds(tok.get('seconds'))} | | |")
  for name, s in stages.items():
    key = "pairwise_accuracy" if name == "reward" else "task_accuracy"
    headline = f"{key} {_fmt(s.get(key))}" if key in s else ""
    out.append(f"| {name} | {_fmt(s['steps'])} | {_fmt(s['tokens'])} | "
               f"{_seconds(s['train_seconds'])} | {_seconds(s['eval_seconds'])} | {headline} |")
  out += ["", "## Metrics", "", "| metric | " + " | ".join(names) + " |",
          "|---|" + "---|" * len(names)]
  keys = [k for k, _ in ROWS] + sorted({k for s in stages.values() for k in s
                                       if k.startswith(("task_accuracy/", "lm_eval/"))})
  labels = dict(ROWS)
  for key in keys:
    if any(key in s for s in stages.values()):
      out.append(f"| {labels.get(key, key)} | "
                 + " | ".join(_fmt(stages[n].get(key)) for n in names) + " |")
  out += notes(stages)
  if plot_files:
    out += ["", "## Plots", ""]
    out += [f"![{os.path.basename(p)}]({os.path.relpath(p, workdir)})" for p in plot_files]
  out += ["", "## Sample completions", ""]
  for name, s in stages.items():
    if not s["samples"]:
      continue
    out += [f"### {name}", ""]
    for sample in shown(s["samples"], n_samples):
      mark = "right" if sample.get("correct") else "wrong"
      out += [f"- **{sample['prompt']}** (answer {sample.get('answer')}; {mark})",
              "  ```", *[f"  {line}" for line in (sample["greedy"] or "(empty)").splitlines()],
              "  ```"]
    out.append("")
  out += ["## Estimated cost", "",
          f"- This run: {_seconds(result['total_seconds'])} on this machine; on a {cost['cpu_vm']} "
          f"at ${cost['cpu_vm_price_per_hour']}/h that is ${cost['cpu_vm_cost']:.4f}.",
          f"- Its training FLOPs ({cost['train_flops']:.3g}, PaLM-style, generation and "
          f"evaluation left out) on {cost['accelerator']} at {cost['accelerator_mfu']:.0%} MFU "
          f"and ${cost['accelerator_price_per_hour']}/h: {cost['accelerator_hours'] * 3600:.2f} s, "
          f"${cost['accelerator_cost']:.6f}.",
          "- Prices are the config's `report.*` fields (list prices, no discounts); change them "
          "there.", ""]
  return "\n".join(out)
