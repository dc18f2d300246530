"""Training-step and decode speed on synthetic tokens: tokens/s, MFU, step time, memory.

  python tools/bench.py --preset tinyllama_1b --task pretrain
  python tools/bench.py --preset llama_150m,tinyllama_1b --task pretrain,sft,dpo --json out.json
  python tools/bench.py --preset tinyllama_1b --task decode --batch 64 --seq 128 --new_tokens 256
  python tools/bench.py --preset tinyllama_1b --task decode --batch 64 --requests 1024 \
      --min_new_tokens 16 --new_tokens 512 --steps 1      # continuous vs static batching
  python tools/bench.py --preset llama3_8b --task sft --set lora.rank=16 \
      --set model.param_dtype=bfloat16 --set model.remat=full
  python tools/bench.py --preset tiny --task pretrain          # CPU: the tiny preset

Presets are jaxlm.config.MODEL_PRESETS (tiny, llama_150m, tinyllama_1b, llama3_3b,
llama3_8b, gpt2_small, qwen3_1_7b, gemma2_2b, gemma3_1b). --batch and --seq default to the preset's usual shape (decode:
--seq is the prompt length, default 128). --set changes any config field, its value read
as the launcher reads --config.KEY=VALUE (jaxlm.cli: booleans are true/false, t/f or 1/0).
The step is the launcher's own (jaxlm.bench).

Prints a table and one JSON line per measurement (tokens/s, MFU, step time as the median
of the timed steps after warm-up, peak device memory, XLA's memory plan, compile time,
and jaxlm.console.environment(): device, date, JAX version, git revision, ...); --json
also writes them to a file. Several presets or tasks run one after another, each in its
own process, so peak memory is each one's own. --profile DIR also traces two timed steps
with jax.profiler and prints the device ops that took the most time.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from jaxlm import fileio


_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset(s), comma-separated.")
_TASK = flags.DEFINE_string("task", "pretrain", "pretrain | sft | dpo | decode, comma-separated.")
_BATCH = flags.DEFINE_integer("batch", 0, "Rows a step (DPO: sequences = 2 x pairs; decode: "
                              "prompts). 0: the preset's default.")
_SEQ = flags.DEFINE_integer("seq", 0, "Row length (decode: prompt length). 0: the default.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Decode: tokens generated per prompt.")
_SAMPLES = flags.DEFINE_integer("samples", 1, "Decode: completions per prompt sharing its "
                                "prefill (a GRPO group); --batch counts rows, prompts x samples.")
_REQUESTS = flags.DEFINE_integer("requests", 0, "Decode: completions of the workload (0: "
                                 "--batch); more: --batch rows at once, refilled as rows "
                                 "finish, timed against static batches of --batch.")
_MIN_NEW = flags.DEFINE_integer("min_new_tokens", 0, "Decode: > 0: each prompt's budget "
                                "log-uniform in [min_new_tokens, new_tokens].")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (decode: timed generate calls).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config settings, e.g. model.remat=full.")
_REFERENCE = flags.DEFINE_enum("reference", "copy", ["copy", "precomputed", "none"],
                               "DPO: how the reference's log-probs are had.")
_JSON = flags.DEFINE_string("json", None, "Also write the results (a JSON list) here.")
_PROFILE = flags.DEFINE_string("profile", None, "Trace two timed steps into this directory.")


def _one(preset, task):
  from jaxlm import bench  # pylint: disable=import-outside-toplevel
  profile = _PROFILE.value and os.path.join(_PROFILE.value, f"{preset}-{task}")
  spec = bench.Spec(preset=preset, task=task, batch=_BATCH.value, seq=_SEQ.value,
                    new_tokens=_NEW.value, samples=_SAMPLES.value, requests=_REQUESTS.value,
                    min_new_tokens=_MIN_NEW.value, steps=_STEPS.value,
                    warmup=_WARMUP.value,
                    overrides=tuple(_SET.value), reference=_REFERENCE.value,
                    profile_dir=profile or "")
  return bench.run(spec)


def _child(preset, task) -> dict:
  """One measurement in a fresh process: its own peak memory, its own compile."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    cmd = [sys.executable, os.path.abspath(__file__), f"--preset={preset}", f"--task={task}",
           f"--json={out}", f"--batch={_BATCH.value}", f"--seq={_SEQ.value}",
           f"--new_tokens={_NEW.value}", f"--samples={_SAMPLES.value}",
           f"--requests={_REQUESTS.value}", f"--min_new_tokens={_MIN_NEW.value}",
           f"--steps={_STEPS.value}",
           f"--warmup={_WARMUP.value}",
           f"--reference={_REFERENCE.value}", *[f"--set={s}" for s in _SET.value]]
    if _PROFILE.value:
      cmd.append(f"--profile={_PROFILE.value}")
    proc = subprocess.run(cmd, check=False)
    if proc.returncode or not os.path.exists(out):
      return {"preset": preset, "task": task, "error": f"exit status {proc.returncode}"}
    with open(out, encoding="utf-8") as f:
      return json.load(f)[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  presets = [p for p in _PRESET.value.split(",") if p]
  tasks = [t for t in _TASK.value.split(",") if t]
  combos = [(p, t) for p in presets for t in tasks]
  if len(combos) == 1:
    from jaxlm.errors import ConfigError  # pylint: disable=import-outside-toplevel
    try:
      results = [_one(*combos[0])]
    except ConfigError as e:
      print(f"config error: {e}", file=sys.stderr)
      sys.exit(2)
  else:
    results = [_child(p, t) for p, t in combos]
  from jaxlm import bench  # pylint: disable=import-outside-toplevel
  for r in results:
    for p in r.pop("profile", None) or []:
      print(f"  {100 * p['share']:5.1f}%  {p['ms']:9.2f} ms  {p['calls']:6d}x  {p['op']}")
    t = r.get("profile_totals") or {}
    if t:
      per_step = (f" ({t['kernels_per_token_step']:.0f} a token step, "
                  f"{t['kernels_per_layer_step']:.1f} a layer, {t['gap_us_per_kernel']:.2f} us "
                  f"between kernels)" if "kernels_per_token_step" in t else "")
      print(f"  {t['kernels']} kernels{per_step}; device busy {t['busy_ms']:.1f} of "
            f"{t['span_ms']:.1f} ms")
  print(bench.format_table(results))
  for r in results:
    if r.get("task") == "decode" and "of_floor" in r:
      print(bench.format_floor(r))
    if r.get("task") == "decode" and "continuous_speedup" in r:
      print(bench.format_workload(r))
  for r in results:
    print(json.dumps(r, sort_keys=True))
  if _JSON.value:
    fileio.atomic_write_json(_JSON.value, results, indent=1, sort_keys=True)
  if any(r.get("error") for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
