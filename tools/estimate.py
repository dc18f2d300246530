r"""What a training run will cost: FLOPs, accelerator-hours, dollars, memory per device.

  python tools/estimate.py --preset llama3_405b --tokens 15.6T --hardware h100 --mfu 0.40
  python tools/estimate.py --preset gpt3_175b --tokens 300B --hardware v100 --mfu 0.224
  python tools/estimate.py --preset tinyllama_1b --tokens 1T --hardware h100 --mfu 45 \
      --devices 16 --batch 512 --seq 2048 --json
  python tools/estimate.py --config configs/pretrain_llama.py:preset=llama_150m \
      --tokens 3B --hardware tpu-v5e --mfu 0.5 --devices 8 --mesh data=2,fsdp=4 --remat full
  python tools/estimate.py --config configs/pretrain_tiny.py --vocab 4096 --tokens 2M \
      --hardware a100 --mfu 0.3
  python tools/estimate.py --preset llama3_8b --tokens 15T --hardware tpu-v5p --mfu 0.5 \
      --devices 512 --batch 1024 --seq 8192 --mesh data=2,fsdp=-1,tensor=4 --price 2.50

--preset is a jaxlm.config.MODEL_PRESETS shape (tiny, llama_150m, tinyllama_1b,
llama3_3b, llama3_8b, gpt2_small) or a public reference model for estimates only
(llama3_405b, gpt3_175b). --config takes the model, data.seq_len, data.batch_size,
optimizer.grad_accum_steps, mesh and model.remat from a jaxlm config file; flags
override them. A model with vocab_size 0 (the tokenizer's size: the tiny preset, most
configs) needs --vocab N, padded to model.vocab_multiple as training pads it.

FLOPs per token are PaLM-style (jaxlm.model.flops_per_token: 6N + 12*L*H*K*T);
total_flops_6nd is 6 x all parameters x tokens. Accelerator-hours = total FLOPs /
(peak x MFU) / 3600. The default prices per device-hour are list-price-like
placeholders (h100 $3.00, h200 $3.80, a100 $1.80, v100 $0.90, tpu-v5p $4.20, tpu-v5e
$1.20, tpu-v6e $2.70): replace them with yours via --price. Memory per device is an
estimate (sharded params, grads and AdamW state; activations under the remat policy;
float32 logits) without XLA temporaries or fragmentation; see jaxlm/estimate.py.

Prints a table, or with --json one JSON object. A bad input is one line on stderr and
exit status 2.
"""

import json
import sys

from absl import app, flags

from jaxlm import estimate as est


_CONFIG = flags.DEFINE_string("config", None, "A jaxlm config file, FILE[:ARG] "
                              "(configs/*.py). Exclusive with --preset.")
_PRESET = flags.DEFINE_string("preset", None, "A model preset: " + ", ".join(est.model_names())
                              + ". Exclusive with --config.")
_TOKENS = flags.DEFINE_string("tokens", None, "Training tokens: 15.6e12, 15.6T, 300B, 2M, 500K.")
_HARDWARE = flags.DEFINE_string("hardware", None, "Accelerator: " + "|".join(est.HARDWARE) + ".")
_MFU = flags.DEFINE_string("mfu", None, "Model FLOPs utilization: a fraction (0.4) or "
                           "percent (40).")
_PRICE = flags.DEFINE_float("price", None, "USD per device-hour; default: the hardware's "
                            "list-price-like placeholder (replace it with yours).")
_DEVICES = flags.DEFINE_integer("devices", None, "Devices in the run: wall-clock days, step "
                                "time, and the mesh (default: all of them on fsdp).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch in sequences (default: the "
                              "config's; none for a preset: no step time or activations).")
_SEQ = flags.DEFINE_integer("seq", None, "Sequence length (default: the config's data.seq_len "
                            "or the preset's usual one).")
_MESH = flags.DEFINE_string("mesh", None, "data=..,fsdp=..,tensor=.. (one may be -1: the rest "
                            "of --devices). Default: the config's, else all devices on fsdp.")
_REMAT = flags.DEFINE_string("remat", None, "none|minimal|full (default: model.remat).")
_VOCAB = flags.DEFINE_integer("vocab", None, "Vocabulary size; required when the config's "
                              "model.vocab_size is 0 (padded to model.vocab_multiple).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


class _Usage(Exception):
  """A bad input: one line for stderr."""


def _check(flag: str, value, fn):
  """fn(value), with an EstimateError turned into one line naming the flag."""
  try:
    return fn(value)
  except est.EstimateError as e:
    raise _Usage(f"--{flag}={value}: {e}") from e


def _positive(flag: str, value):
  if value is not None and value < 1:
    raise _Usage(f"--{flag}={value}: must be >= 1")
  return value


def _inputs() -> dict:
  """The flags, checked, as keyword arguments of jaxlm.estimate.estimate."""
  if bool(_CONFIG.value) == bool(_PRESET.value):
    raise _Usage("give exactly one of --config FILE[:ARG] and --preset NAME")
  for name, flag in (("tokens", _TOKENS), ("hardware", _HARDWARE), ("mfu", _MFU)):
    if flag.value is None:
      raise _Usage(f"--{name} is required")
  hardware = _HARDWARE.value.lower().replace("_", "-")
  if hardware not in est.HARDWARE:
    raise _Usage(f"--hardware={_HARDWARE.value}: must be one of {', '.join(est.HARDWARE)}")
  if _REMAT.value is not None and _REMAT.value not in est.REMAT_POLICIES:
    raise _Usage(f"--remat={_REMAT.value}: must be one of {', '.join(est.REMAT_POLICIES)}")
  if _PRICE.value is not None and _PRICE.value < 0:
    raise _Usage(f"--price={_PRICE.value}: must be >= 0")
  for name, flag in (("devices", _DEVICES), ("batch", _BATCH), ("seq", _SEQ),
                     ("vocab", _VOCAB)):
    _positive(name, flag.value)
  tokens = _check("tokens", _TOKENS.value, est.parse_tokens)
  mfu = _check("mfu", _MFU.value, est.parse_mfu)

  if _PRESET.value:
    cfg = _check("preset", _PRESET.value, est.preset_model)
    name = _PRESET.value
    seq, batch, grad_accum = est.default_seq_len(name, cfg), None, 1
    mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    source = f"preset {name}"
  else:
    c = _check("config", _CONFIG.value, est.load_config)
    cfg, name = c.model, _CONFIG.value
    seq, batch = int(c.data.seq_len), int(c.data.batch_size)
    grad_accum = int(c.optimizer.grad_accum_steps)
    mesh = {a: int(c.mesh[a]) for a in est.MESH_AXES}
    source = _CONFIG.value
  if _VOCAB.value:  # a tokenizer's size is padded as training pads it
    m = cfg.vocab_multiple if cfg.vocab_size == 0 else 1
    cfg.vocab_size = -(-_VOCAB.value // m) * m
  elif cfg.vocab_size == 0:
    raise _Usage(f"--vocab: {source} sets model.vocab_size=0 (the tokenizer's size); "
                 "give --vocab N")

  explicit_mesh = _MESH.value is not None
  if explicit_mesh:
    mesh = _check("mesh", _MESH.value, est.parse_mesh)
  devices = _DEVICES.value
  if devices is None and explicit_mesh and -1 not in mesh.values():
    devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  try:
    est.resolve_mesh(mesh, devices)
  except est.EstimateError as e:
    where = f"--mesh={_MESH.value}" if explicit_mesh else f"the mesh of {source}"
    raise _Usage(f"{where} with --devices={devices}: {e}") from e
  return dict(cfg=cfg, name=name,
              tokens=tokens, hardware=hardware, mfu=mfu,
              seq_len=_SEQ.value or seq, price=_PRICE.value, devices=devices,
              batch=_BATCH.value or batch, mesh=mesh, remat=_REMAT.value,
              grad_accum=grad_accum)


def _parse_flags(argv):
  """absl's parsing, with a bad or unknown flag as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  try:
    if len(argv) > 1:
      raise _Usage(f"unexpected arguments: {' '.join(argv[1:])}")
    kwargs = _inputs()
    cfg = kwargs.pop("cfg")
    result = est.estimate(cfg, **kwargs)
  except _Usage as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except est.EstimateError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(result, sort_keys=True))
  else:
    print(est.format_text(result))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
