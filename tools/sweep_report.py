"""A sweep's trials side by side: final and best metric per trial, as a table and a plot.

  python tools/sweep_report.py runs/tiny_lr                     # best eval_loss, lowest first
  python tools/sweep_report.py runs/tiny_lr --metric loss
  python tools/sweep_report.py runs/rm_sweep --metric eval_accuracy --mode max

Reads every trial folder of DIR (each with metrics.jsonl or summary.json, as
`python -m jaxlm.launch --sweep` makes them; the trials' overrides come from
DIR/sweep.json when present), writes DIR/sweep_report.md, sweep_report.csv and
sweep_report.png, and prints the Markdown table.
"""

import os
import sys

from absl import app, flags

from jaxlm import sweep
from jaxlm.errors import ConfigError


_METRIC = flags.DEFINE_string("metric", "eval_loss", "The metrics.jsonl key to compare.")
_MODE = flags.DEFINE_enum("mode", "min", ["min", "max"], "Whether lower or higher is better.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: tools/sweep_report.py DIR [--metric KEY] [--mode min|max]")
  try:
    sweep.report(argv[1], _METRIC.value, _MODE.value)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  with open(os.path.join(argv[1], "sweep_report.md"), encoding="utf-8") as f:
    print(f.read(), end="")


if __name__ == "__main__":
  app.run(main)
