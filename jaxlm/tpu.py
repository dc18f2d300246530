"""Cloud TPU jobs: one command from nothing to a run on every worker of a TPU VM slice.

    python -m jaxlm.launch --config configs/pretrain_llama.py:preset=llama_150m \\
        --workdir gs://BUCKET/runs/l150 --tpu my-v5p --zone us-east5-a --accelerator v5p-64 --spot

drives `gcloud` through these steps (`--tpu_action`, default `up`):

  create  a queued resource (spot with --spot), then waits until the slice is ACTIVE
  copy    the code (the git checkout's files, uncommitted edits included) to every worker
  setup   a virtualenv with jaxlm and jax[tpu] on every worker; a gs:// workdir's bucket
          mounted with gcsfuse at /gcs/BUCKET on every worker
  run     `python -m jaxlm.launch ...` on all workers at once (`--worker=all`), detached,
          logging to ~/jaxlm.log; JAX finds the slice's other workers itself
  logs    follows worker 0's log
  watch   waits for the run; when the slice is preempted, deletes it, creates it again and
          reruns: the run resumes from its last checkpoint in the workdir
  delete  deletes the queued resource and its slice

`up` is create, copy, setup, run. `--dry_run` prints every gcloud command and runs none.
A sweep (`--sweep --tpu NAME`) makes one slice per trial, named NAME-<trial number>.

Every string a user gives is checked before any command is built (`Job`): the TPU name,
zone, accelerator type, project, runtime version and a gs:// workdir's bucket against
their documented character sets (`NAME_RULES`), and every string that enters a worker's
shell (config path, workdir, overrides, bucket) is quoted with shlex.quote.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import subprocess
import sys
import time

from jaxlm.errors import TpuError


# Config keys naming paths on the workers, which only the run there can check.
REMOTE_KEYS = ("data.train", "data.eval", "data.tokenizer", "init_from", "dpo.reference_from",
               "eval.model")
ACTIONS = ("up", "create", "copy", "setup", "run", "logs", "watch", "delete")
REMOTE_DIR = "~/jaxlm"
VENV = "~/jaxlm-venv"
LOG = "~/jaxlm.log"

# The TPU VM software each generation boots with (gcloud's --runtime-version).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


# flag -> (pattern, what it must be). The TPU name is a Google Cloud resource name (RFC
# 1035: what `gcloud compute tpus queued-resources create` takes as its id and node id);
# zones are REGION-LETTER (us-east5-a); accelerator types GENERATION-SIZE; project ids
# 6-30 characters (an organization's `example.com:` prefix allowed); runtime versions
# like v2-alpha-tpuv5 or tpu-ubuntu2204-base.
NAME_RULES = {
    "--tpu": (r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
              "1-63 lowercase letters, digits and hyphens, starting with a letter and not "
              "ending with a hyphen"),
    "--zone": (r"[a-z]+-[a-z]+[0-9]+-[a-z]", "a zone like us-east5-a or europe-west4-b"),
    "--accelerator": (r"v[0-9]+[a-z]*-[0-9]+", "a type like v5p-64, v5litepod-16 or v6e-8"),
    "--project": (r"([a-z0-9][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]",
                  "a project id: 6-30 lowercase letters, digits and hyphens, starting with "
                  "a letter"),
    "--runtime_version": (r"[a-z0-9][-a-z0-9._]{0,99}",
                          "a TPU runtime version like v2-alpha-tpuv5 (lowercase letters, "
                          "digits, '-', '.', '_')"),
}


def check_name(flag: str, value: str) -> str:
  """`value` if it is a valid `flag` (NAME_RULES), else TpuError naming the flag."""
  pattern, rule = NAME_RULES[flag]
  if not isinstance(value, str) or not re.fullmatch(pattern, value):
    raise TpuError(f"{flag}={value!r}: not {rule}")
  return value


def check_bucket(bucket: str, flag: str = "--workdir") -> str:
  """A Cloud Storage bucket name by its documented rules, else TpuError naming `flag`:
  lowercase letters, digits, '-', '_' and '.'; starting and ending with a letter or
  digit; 3-63 characters (up to 222 with dots, each dot-separated part at most 63); not
  an IP address; not starting with "goog" or containing "google"."""
  problem = None
  if not re.fullmatch(r"[a-z0-9][-a-z0-9_.]*[a-z0-9]", bucket):
    problem = ("lowercase letters, digits, '-', '_' and '.', starting and ending with a "
               "letter or digit")
  elif not 3 <= len(bucket) <= (222 if "." in bucket else 63) or any(
      not 1 <= len(part) <= 63 for part in bucket.split(".")):
    problem = "3-63 characters, or up to 222 with dots and 1-63 between two dots"
  elif bucket.startswith("goog") or "google" in bucket:
    problem = "not starting with 'goog' or containing 'google'"
  else:
    try:
      ipaddress.IPv4Address(bucket)
      problem = "not an IP address"
    except ValueError:
      pass
  if problem:
    raise TpuError(f"{flag}: bucket name {bucket!r} is not a Cloud Storage bucket name "
                   f"({problem})")
  return bucket


def _check_text(flag: str, value: str) -> None:
  """A path or override, which a worker's shell receives quoted: any character but a
  control character (a line break, NUL: no command line carries those intact)."""
  if not isinstance(value, str) or re.search(r"[\x00-\x1f\x7f]", value):
    raise TpuError(f"{flag}={value!r}: holds a control character (a line break, NUL, ...)")


def slice_devices(accelerator: str) -> int:
  """JAX devices of a slice: v4 and v5p names count TensorCores (two a chip, one device),
  v5e (v5litepod) and v6e names count chips."""
  if not isinstance(accelerator, str) or not re.fullmatch(NAME_RULES["--accelerator"][0],
                                                          accelerator):
    raise TpuError(f"--accelerator={accelerator!r}: expected a type like v5p-64 or v6e-8")
  generation, _, size = accelerator.rpartition("-")
  return int(size) // 2 if generation in ("v4", "v5p") else int(size)


@dataclasses.dataclass
class Job:
  name: str
  zone: str
  accelerator: str                  # e.g. v5p-64, v5litepod-16, v6e-8
  config: str                       # FILE[:ARG]
  workdir: str                      # gs://BUCKET/path or a path every worker sees
  overrides: tuple = ()             # "--config.KEY=VALUE" flags for the run
  project: str = ""
  runtime_version: str = ""
  spot: bool = False

  def __post_init__(self):
    """Every user string checked (NAME_RULES, check_bucket) before a command is built."""
    if not self.name or not self.zone or not self.accelerator:
      raise TpuError("--tpu, --zone and --accelerator are all needed for a Cloud TPU job")
    check_name("--tpu", self.name)
    check_name("--zone", self.zone)
    slice_devices(self.accelerator)
    if self.project:
      check_name("--project", self.project)
    if self.runtime_version:
      check_name("--runtime_version", self.runtime_version)
    _check_text("--config", self.config)
    _check_text("--workdir", self.workdir)
    for flag in self.overrides:
      _check_text(flag.split("=", 1)[0], flag)
    if self.workdir.startswith("gs://"):
      check_bucket(self.bucket)
    generation = self.accelerator.rsplit("-", 1)[0]
    if not self.runtime_version:
      if generation not in RUNTIMES:
        raise TpuError(f"--accelerator={self.accelerator}: no default runtime for "
                       f"{generation!r}; give --runtime_version")
      self.runtime_version = RUNTIMES[generation]

  def gcloud(self, *args) -> list[str]:
    project = [f"--project={self.project}"] if self.project else []
    return ["gcloud", *args, f"--zone={self.zone}", *project]

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return self.gcloud("compute", "tpus", "tpu-vm", "ssh", self.name, f"--worker={worker}",
                       f"--command={command}")

  @property
  def bucket(self) -> str | None:
    return self.workdir[len("gs://"):].split("/", 1)[0] if self.workdir.startswith("gs://") else None

  @property
  def remote_workdir(self) -> str:
    """The workdir as the workers see it: a gs:// path under its gcsfuse mount."""
    return "/gcs/" + self.workdir[len("gs://"):] if self.bucket else self.workdir


def create(job: Job) -> list[list[str]]:
  cmd = job.gcloud("compute", "tpus", "queued-resources", "create", job.name,
                   f"--node-id={job.name}", f"--accelerator-type={job.accelerator}",
                   f"--runtime-version={job.runtime_version}")
  return [cmd + (["--spot"] if job.spot else [])]


def state(job: Job) -> list[str]:
  return job.gcloud("compute", "tpus", "queued-resources", "describe", job.name,
                    "--format=value(state.state)")


def copy(job: Job, archive: str) -> list[list[str]]:
  return [job.gcloud("compute", "tpus", "tpu-vm", "scp", archive, f"{job.name}:~/jaxlm.tar.gz",
                     "--worker=all"),
          job.ssh(f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                  f"tar -xzf ~/jaxlm.tar.gz -C {REMOTE_DIR}")]


# In the remote commands below, REMOTE_DIR, VENV and LOG are this module's constants,
# written bare so that the worker's shell expands their `~`; every other word is quoted.


def setup(job: Job) -> list[list[str]]:
  steps = [f"python3 -m venv {VENV}",
           f"{VENV}/bin/pip install -q --upgrade pip",
           f"{VENV}/bin/pip install -q -e {REMOTE_DIR} 'jax[tpu]'"]
  if job.bucket:
    bucket, mount = shlex.quote(job.bucket), shlex.quote(f"/gcs/{job.bucket}")
    steps.append(f"sudo mkdir -p {mount} && sudo chown \"$USER\" {mount} && "
                 f"(mountpoint -q {mount} || gcsfuse --implicit-dirs {bucket} {mount})")
  return [job.ssh(" && ".join(steps))]


def run_argv(job: Job) -> list[str]:
  """The launcher's argv on every worker (after the venv's python)."""
  return ["-m", "jaxlm.launch", "--config", job.config, "--workdir", job.remote_workdir,
          "--config.progress=log", *job.overrides]


def launch_command(job: Job) -> str:
  run = f"{VENV}/bin/python " + shlex.join(run_argv(job))
  # JAXLM_DISTRIBUTED=auto: jax.distributed finds the slice's workers itself.
  return (f"cd {REMOTE_DIR} && (JAXLM_DISTRIBUTED=auto nohup {run} > {LOG} 2>&1; "
          f"echo $? > ~/jaxlm.exit) > /dev/null 2>&1 < /dev/null &")


def run(job: Job) -> list[list[str]]:
  return [job.ssh(f"rm -f ~/jaxlm.exit && {launch_command(job)}")]


def logs(job: Job) -> list[list[str]]:
  return [job.ssh(f"tail -n +1 -F {LOG}", worker="0")]


def delete(job: Job) -> list[list[str]]:
  return [job.gcloud("compute", "tpus", "queued-resources", "delete", job.name, "--force",
                     "--quiet")]


def code_archive(root: str, out: str) -> list[str]:
  """The command that packs the checkout (tracked and untracked-not-ignored files)."""
  return ["sh", "-c", f"cd {shlex.quote(root)} && git ls-files -z --cached --others "
          f"--exclude-standard | tar --null -czf {shlex.quote(out)} -T -"]


class Runner:
  """Runs (or, dry, prints) commands; `check` for one whose failure ends the job."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run, self._out = dry_run, out

  @property
  def out(self):
    return self._out or sys.stdout

  def __call__(self, cmd: list[str], capture: bool = False) -> str:
    print(shlex.join(cmd), file=self.out, flush=True)
    if self.dry_run:
      return ""
    p = subprocess.run(cmd, check=False, text=True,
                       stdout=subprocess.PIPE if capture else None)
    if p.returncode:
      raise TpuError(f"exit status {p.returncode}: {shlex.join(cmd)}")
    return (p.stdout or "").strip()


def slice_state(job: Job, sh: Runner) -> str:
  """The queued resource's state; "" once it is gone (describe then fails)."""
  try:
    return sh(state(job), capture=True)
  except TpuError:
    return ""


def wait_active(job: Job, sh: Runner, poll_s: float = 30.0) -> None:
  """Until the queued resource is ACTIVE (the slice is up); an error if it fails."""
  if sh.dry_run:
    sh(state(job), capture=True)
    return
  while True:
    s = slice_state(job, sh)
    if s == "ACTIVE":
      return
    if s in ("FAILED", "SUSPENDED"):
      raise TpuError(f"queued resource {job.name} is {s}")
    time.sleep(poll_s)


def perform(job: Job, action: str, sh: Runner, root: str, watch_poll_s: float = 60.0) -> None:
  archive = os.path.join("/tmp", f"jaxlm-{job.name}.tar.gz")
  steps = {"up": ("create", "copy", "setup", "run")}.get(action, (action,))
  for step in steps:
    if step == "create":
      for cmd in create(job):
        sh(cmd)
      wait_active(job, sh)
    elif step == "copy":
      sh(code_archive(root, archive))
      for cmd in copy(job, archive):
        sh(cmd)
    elif step == "setup":
      for cmd in setup(job):
        sh(cmd)
    elif step == "run":
      for cmd in run(job):
        sh(cmd)
      print(f"# follow it: python -m jaxlm.launch ... --tpu {job.name} --zone {job.zone} "
            f"--accelerator {job.accelerator} --tpu_action=logs", file=sh.out)
    elif step == "logs":
      for cmd in logs(job):
        sh(cmd)
    elif step == "delete":
      for cmd in delete(job):
        sh(cmd)
    elif step == "watch":
      watch(job, sh, root, watch_poll_s)
    else:
      raise TpuError(f"--tpu_action={action}: one of {', '.join(ACTIONS)}")


def watch(job: Job, sh: Runner, root: str, poll_s: float) -> int:
  """Wait for the run's exit status; on preemption recreate the slice and rerun (the run
  resumes from its last checkpoint). Returns the run's exit status."""
  done = job.ssh("cat ~/jaxlm.exit 2>/dev/null || true", worker="0")
  if sh.dry_run:  # the loop's commands, once each
    sh(state(job), capture=True)
    sh(done, capture=True)
    for cmd in delete(job):
      sh(cmd)
    perform(job, "up", sh, root)
    return 0
  while True:
    s = slice_state(job, sh)
    if s == "ACTIVE":
      status = sh(done, capture=True)
      if status.isdigit():
        print(f"{job.name}: the run exited with status {status}", file=sh.out)
        return int(status)
      if status:
        raise TpuError(f"{job.name}: ~/jaxlm.exit on worker 0 holds {status[:80]!r}, not an "
                       f"exit status")
    elif s in ("PREEMPTED", "SUSPENDED", "FAILED", ""):
      print(f"{job.name}: slice {s or 'gone'}; creating it again and resuming", file=sh.out)
      if s:
        for cmd in delete(job):
          sh(cmd)
      perform(job, "up", sh, root)
    time.sleep(poll_s)
