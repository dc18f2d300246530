"""Convert between Hugging Face model directories and jaxlm checkpoints.

  python tools/convert_hf.py --hf path/to/hf_model --to_jaxlm runs/imported
  python tools/convert_hf.py --jaxlm runs/sft --to_hf exports/sft_hf

The first writes a directory that `init_from` takes (model config, params at step 0,
tokenizer files); the second writes config.json + safetensors that transformers'
`from_pretrained` loads. See jaxlm.hf.
"""

import sys

from absl import app, flags

from jaxlm import hf

_HF = flags.DEFINE_string("hf", None, "A Hugging Face model directory to import.")
_TO_JAXLM = flags.DEFINE_string("to_jaxlm", None, "Where to write the jaxlm directory.")
_JAXLM = flags.DEFINE_string("jaxlm", None, "A jaxlm workdir, checkpoints folder or step "
                             "folder to export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Where to write the Hugging Face directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if _HF.value and _TO_JAXLM.value:
      out = hf.import_hf(_HF.value, _TO_JAXLM.value)
    elif _JAXLM.value and _TO_HF.value:
      out = hf.export_hf(_JAXLM.value, _TO_HF.value)
    else:
      raise app.UsageError("give --hf DIR --to_jaxlm DIR, or --jaxlm DIR --to_hf DIR")
  except (hf.HFError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
