"""Convert between Hugging Face model directories and jaxlm checkpoints.

  python tools/convert_hf.py --hf path/to/hf_model --to_jaxlm runs/imported
  python tools/convert_hf.py --jaxlm runs/sft --to_hf exports/sft_hf

The first writes a directory that `init_from` takes (model config, params at step 0,
tokenizer files); the second writes config.json + safetensors that transformers'
`from_pretrained` loads. Either output is written whole into a staging folder beside it
and renamed into place: it must be new, empty, or an earlier output of the same
direction, which it replaces whole (see jaxlm.hf.staged_export). A mistake is one line
on stderr and exit status 2 (1 for a failed write, a full disk say); library logs stay
quiet unless --verbosity asks for them.
"""

import sys

from absl import app, flags

from jaxlm import console, runs
from jaxlm.errors import ConfigError, one_line


_HF = flags.DEFINE_string("hf", None, "A Hugging Face model directory to import.")
_TO_JAXLM = flags.DEFINE_string("to_jaxlm", None, "Where to write the jaxlm directory.")
_JAXLM = flags.DEFINE_string("jaxlm", None, "A jaxlm workdir, checkpoints folder or step "
                             "folder to export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Where to write the Hugging Face directory.")


def convert() -> str:
  if _HF.value and _TO_JAXLM.value and not (_JAXLM.value or _TO_HF.value):
    return runs.import_hf(_HF.value, _TO_JAXLM.value)
  if _JAXLM.value and _TO_HF.value and not (_HF.value or _TO_JAXLM.value):
    return runs.export_hf(_JAXLM.value, _TO_HF.value)
  raise ConfigError("give --hf DIR --to_jaxlm DIR, or --jaxlm DIR --to_hf DIR")


def main(argv):
  if len(argv) > 1:
    print(one_line(f"error: unexpected arguments: {' '.join(argv[1:])}"), file=sys.stderr)
    sys.exit(2)
  console.quiet()  # orbax's INFO lines and late async tracebacks, unless --verbosity
  try:
    out = convert()
  except (ConfigError, FileNotFoundError, ValueError) as e:  # HFError is a ConfigError
    print(one_line(f"error: {e}"), file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, _write_errors()):
      raise
    print(one_line(f"error: {e}"), file=sys.stderr)
    sys.exit(1)
  print(f"wrote {out}")


def _write_errors() -> tuple:
  """A failed write (a full disk) or an unreadable checkpoint: OSError, and CheckpointError
  once jaxlm.checkpoint is loaded (importing it here would import jax for every mistake)."""
  checkpoint = sys.modules.get("jaxlm.checkpoint")
  return (OSError,) + ((checkpoint.CheckpointError,) if checkpoint else ())


if __name__ == "__main__":
  app.run(main)
