"""Where training numbers go: metrics.jsonl, TensorBoard events, the console, and
Weights & Biases when `logging.wandb_project` is set.

Only process 0 writes. On a terminal the console is a progress bar with step, loss,
tokens/s, MFU and ETA; otherwise plain log lines every `log_every` steps. W&B gets the
same scalars at the same steps and the resolved config; its run id is kept in the
workdir (WANDB_RUN_ID_FILE), so a resumed run goes on in the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid

import jax
from tqdm import tqdm

from jaxlm import console, fileio


WANDB_RUN_ID_FILE = "wandb_run_id"

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
PEAK_TFLOPS = (
    ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("TPU v6", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one local device; None when unknown (CPU) and not overridden."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS:
    if name in kind:
      return tflops * 1e12
  return None


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Append-only metrics for one run directory."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int | None,
               progress: str = "auto", wandb=None, run_config: dict | None = None):
    """`start_step`: the step a run resumes from (its records up to there are kept), or
    None for a fresh start (records left by an earlier attempt are dropped). `wandb`:
    the config's `logging` section (W&B when its wandb_project is set), `run_config` the
    resolved config it records."""
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.start_step = start_step or 0
    self.kept = []
    self.t0 = time.time()
    self.bar = None
    self.tb = None
    self.wandb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._truncate_after(-1 if start_step is None else start_step)
    self.file = open(self.path, "a", encoding="utf-8")
    # purge_step: TensorBoard hides the events of steps after the restored one.
    from tensorboardX import SummaryWriter  # lazy: only when a run writes its event files
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                            purge_step=None if start_step is None else start_step + 1)
    if wandb is not None and wandb.wandb_project:
      self.wandb = _wandb_run(workdir, wandb, run_config)
    use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    if use_bar:
      self.bar = tqdm(total=total_steps, initial=self.start_step, dynamic_ncols=True,
                      unit="step")

  def _truncate_after(self, step: int):
    """On resume, drop records of steps the restored checkpoint does not include (all of
    them on a fresh start), and a last line cut short by a crash. Rewritten whole: a
    temporary file, renamed."""
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8", errors="replace") as f:
      lines = f.readlines()
    for i, line in enumerate(lines):
      try:
        record = json.loads(line)
      except ValueError:
        if line.strip():
          console.warning(f"{self.path}:{i + 1}: dropped a record cut short "
                          f"({len(line)} characters)")
        continue
      if record.get("step", 0) <= step:
        self.kept.append(record)
    fileio.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))

  def history(self, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in the records kept from before this start, in step order."""
    return [(r["step"], r[key]) for r in self.kept if r.get(key) is not None]

  def advance(self, step: int):
    if self.bar is not None:
      self.bar.n = step
      self.bar.refresh()

  def write(self, step: int, metrics: dict, console: bool = True):
    if not self.active:
      return
    record = {"step": int(step)}
    for k, v in metrics.items():
      v = None if v is None else float(v)
      record[k] = None if v is not None and not math.isfinite(v) else v
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for k, v in record.items():
      if k != "step" and v is not None:
        self.tb.add_scalar(k, v, step)
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None},
                     step=int(step))
    if console:
      self._console(step, record)

  def _console(self, step: int, r: dict):
    parts = []
    for key in ("loss", "eval_loss"):
      if key in r:  # None: not finite
        parts.append(f"{key} {r[key]:.4f}" if r[key] is not None else f"{key} non-finite")
    if r.get("tokens_per_s") is not None:
      parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
      parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if self.bar is not None:
      self.bar.set_postfix_str(" | ".join(parts), refresh=False)
      self.advance(step)
      return
    done = step - self.start_step
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
    extra = [f"grad_norm {r['grad_norm']:.3f}"] if r.get("grad_norm") is not None else []
    extra += [f"lr {r['lr']:.3g}"] if r.get("lr") is not None else []
    console.info(f"step {step}/{self.total_steps} | " + " | ".join(parts + extra) +
                 f" | eta {_fmt_eta(eta)}")

  def info(self, message: str):
    if self.active:
      console.info(message)  # through tqdm.write: the bar, if open, is drawn again below

  def close(self):
    if not self.active:
      return
    if self.bar is not None:
      self.bar.close()
    self.tb.close()
    self.file.close()
    if self.wandb is not None:
      self.wandb.finish()


def _wandb_run(workdir: str, settings, run_config: dict | None):
  """A W&B run for this workdir: its id made once and kept in the workdir, so that a
  resume continues it; files under WORKDIR/wandb."""
  import wandb  # lazy: optional, only when logging.wandb_project is set
  path = os.path.join(workdir, WANDB_RUN_ID_FILE)
  run_id = ""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      run_id = f.read().strip()
  if not run_id:
    run_id = uuid.uuid4().hex[:16]
    fileio.atomic_write(path, run_id + "\n")
  return wandb.init(project=settings.wandb_project, entity=settings.wandb_entity or None,
                    mode=settings.wandb_mode or None, dir=workdir, id=run_id, resume="allow",
                    name=os.path.basename(os.path.abspath(workdir)), config=run_config)
