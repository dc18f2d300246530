"""Peak host memory while a Hugging Face checkpoint loads into a run's parameters.

  python tools/bench_hf_load.py make DIR --preset llama3_8b      # a random bf16 checkpoint
  python tools/bench_hf_load.py load DIR --json out.json         # load it, measure the peak

`make` writes the preset's shape as a Hugging Face directory (config.json, one
safetensors shard per layer and one for the rest, the index), each tensor random bf16,
one layer in memory at a time. `load` reads it the way `init_from` does
(`runs.load_params`: every parameter placed on the devices as float32, the training
dtype), in a fresh process, and reports against the checkpoint's size the process's peak
resident memory (VmHWM: its own memory and the page cache of the memory-mapped shards,
which the kernel can drop) and the peak of its own (anonymous) memory alone (RssAnon,
sampled every 10 ms), with the environment of the measurement. It prints with print(),
not jaxlm.console, so that it also runs against older checkouts for a before/after.
"""

import json
import os
import sys
import threading
import time

from absl import app, flags
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import console, fileio, hf, model, runs, sharding  # noqa: E402
from jaxlm.config import DEFAULT_RULES, model_config  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "llama3_8b", "make: the model preset (jaxlm.config).")
_JSON = flags.DEFINE_string("json", None, "load: write the result here too.")


def _status_gib(field: str) -> float:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024 / 2**30
  raise RuntimeError(f"/proc/self/status has no {field}")


def make(folder: str, preset: str) -> None:
  m = model_config(preset, dtype="float32", vocab_multiple=1)
  shapes = model.param_shapes_and_axes(m)
  names = hf._names(m)  # pylint: disable=protected-access  # the tensor names an export writes
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)

  def random(shape):
    return (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

  weight_map = {}

  def write(tensors: dict, file: str):
    safetensors.numpy.save_file(tensors, os.path.join(folder, file))
    weight_map.update({k: file for k in tensors})

  top = {}
  for name, (hf_name, kind) in names["top"].items():
    top[hf_name] = hf.to_hf(random(shapes[name][0]), kind)
  write(top, "top.safetensors")
  for i in range(m.num_layers):
    layer = {}
    for name, (pattern, kind) in names["layer"].items():
      layer[pattern.format(i=i)] = hf.to_hf(random(shapes["layers"][name][0][1:]), kind)
    write(layer, f"layer-{i:03d}.safetensors")
  fileio.atomic_write_json(os.path.join(folder, hf.SAFETENSORS_INDEX),
                           {"metadata": {}, "weight_map": weight_map})
  fileio.atomic_write_json(os.path.join(folder, "config.json"),
                           hf.hf_config_from_model(m, "bfloat16"))
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in set(weight_map.values()))
  print(f"{folder}: {preset}, {size / 2**30:.2f} GiB of bf16 safetensors")


def load(folder: str) -> dict:
  files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
  m = hf.model_config_from_hf(hf.read_json(os.path.join(folder, "config.json")))
  m.param_dtype = "float32"
  mesh = sharding.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1})
  sharder = sharding.Sharder(mesh, DEFAULT_RULES)
  abstract = jax.eval_shape(lambda r: model.init(m, r), jax.random.PRNGKey(0))
  like = sharder.placed(model.param_axes(m), abstract)
  jax.block_until_ready(jax.device_put(np.zeros(4), jax.devices()[0]))  # the runtime is up
  before, anon_before = _status_gib("VmRSS"), _status_gib("RssAnon")
  anon_peak, done = [anon_before], threading.Event()

  def sample():
    while not done.wait(0.01):
      anon_peak[0] = max(anon_peak[0], _status_gib("RssAnon"))
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  t0 = time.perf_counter()
  params = jax.block_until_ready(runs.load_params(folder, like))
  took = time.perf_counter() - t0
  done.set()
  sampler.join()
  peak = _status_gib("VmHWM")
  ckpt = size / 2**30
  result = {"checkpoint_gib": ckpt, "rss_before_gib": before, "peak_rss_gib": peak,
            "peak_over_checkpoint": peak / ckpt,
            "load_growth_over_checkpoint": (peak - before) / ckpt,
            "anon_before_gib": anon_before, "peak_anon_gib": anon_peak[0],
            "peak_anon_over_checkpoint": anon_peak[0] / ckpt,
            "seconds": took, "parameters": model.count_params(params),
            "devices": jax.device_count(), **console.environment()}
  return result


def main(argv):
  if len(argv) != 3 or argv[1] not in ("make", "load"):
    print("usage: bench_hf_load.py make|load DIR [--preset P] [--json FILE]", file=sys.stderr)
    return 2
  if argv[1] == "make":
    make(argv[2], _PRESET.value)
    return 0
  result = load(argv[2])
  print(json.dumps(result, indent=2))
  if _JSON.value:
    fileio.atomic_write_json(_JSON.value, result)
  return 0


if __name__ == "__main__":
  app.run(main)
