"""Plots of one or more runs' metrics.jsonl files (jaxlm.plots), as the pipeline report
makes them: loss curves per stage, reward and KL during RL, accuracy per stage.

  python tools/plot.py runs/pipeline                      # -> runs/pipeline/plots/
  python tools/plot.py runs/pipeline runs/pipeline_ppo --labels grpo,ppo --out plots/cmp
  python tools/plot.py runs/tiny runs/tiny_lr1e-3 --out plots/lr

A run is a workdir: one training run, or a pipeline with a folder per stage.
"""

import os
import sys

from absl import app, flags


_OUT = flags.DEFINE_string("out", "", "Folder for the PNGs (default: <first run>/plots).")
_LABELS = flags.DEFINE_list("labels", [], "A name per run (default: the folder names).")


def main(argv):
  from jaxlm import plots  # pylint: disable=import-outside-toplevel
  runs = argv[1:]
  if not runs:
    raise app.UsageError("give one or more run folders")
  labels = _LABELS.value or [os.path.basename(os.path.normpath(r)) for r in runs]
  if len(labels) != len(runs):
    raise app.UsageError(f"--labels has {len(labels)} names for {len(runs)} runs")
  if len(set(labels)) != len(labels):
    raise app.UsageError(f"two runs share a name ({', '.join(labels)}): name them with "
                         f"--labels")
  for r in runs:
    if not os.path.isdir(r) or not plots.find_stages(r):
      print(f"error: {r}: no metrics.jsonl in it or in its subfolders", file=sys.stderr)
      sys.exit(2)
  named = dict(zip(labels, runs)) if len(runs) > 1 else {"": runs[0]}
  made = plots.plot_all(named, _OUT.value or os.path.join(runs[0], "plots"))
  for path in made:
    print(path)


if __name__ == "__main__":
  app.run(main)
