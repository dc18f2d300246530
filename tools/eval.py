"""Evaluate any checkpoint as the pipeline does after each stage (jaxlm.evaluate).

  python tools/eval.py --model runs/pipeline/sft --tasks builtin:world_prompts:eval \
      --out runs/eval/sft
  python tools/eval.py --model path/to/hf_model --tasks gsm8k_test.jsonl --max_tasks 200 \
      --max_new_tokens 256 --chat_template hf --out runs/eval/hf_gsm8k
  python tools/eval.py --model runs/pipeline/reward --pairs hh_rlhf_harmless_test.jsonl.gz \
      --out runs/eval/rm_hh
  python tools/eval.py --model runs/pipeline/dpo --tasks builtin:world_prompts:eval \
      --reference runs/pipeline/sft --reward_model runs/pipeline/reward \
      --baseline runs/pipeline/sft/eval --out runs/eval/dpo

  python tools/eval.py --model runs/pipeline/sft --tasks builtin:world_prompts:eval \
      --lm_eval_tasks hellaswag,arc_easy --lm_eval_dtype float32 --out runs/eval/sft

--model is a jaxlm run (pretrain, SFT, LoRA, DPO, GRPO, PPO: a language model; reward:
a reward model) or a Hugging Face directory. Writes eval.json and samples.jsonl into
--out and prints the metrics. The same as
`python -m jaxlm.launch --config FILE --workdir OUT` with config.task = "eval".
--lm_eval_tasks also runs those lm-evaluation-harness tasks on the model (jaxlm.harness,
the `eval` extra) and adds their results to eval.json as metrics["lm_eval"]; lm_eval's
whole output goes to lm_eval.json beside it.
"""

import json
import os
import sys

from absl import app, flags

from jaxlm import console


_MODEL = flags.DEFINE_string("model", None, "The checkpoint: a jaxlm run or a HF directory.")
_OUT = flags.DEFINE_string("out", None, "Folder for eval.json and samples.jsonl.")
_TASKS = flags.DEFINE_string("tasks", "", "Prompt records with an `answer` field "
                             "(GSM8K-style JSONL, or builtin:world_prompts:eval).")
_TEXT = flags.DEFINE_string("text", "", "Held-out text for perplexity (globs or builtin:...).")
_PAIRS = flags.DEFINE_string("pairs", "", "Preference pairs (reward models).")
_REWARD_MODEL = flags.DEFINE_string("reward_model", "", "A reward run judging the answers.")
_BASELINE = flags.DEFINE_string("baseline", "", "Another evaluation's folder: win rate against it.")
_REFERENCE = flags.DEFINE_string("reference", "", "A model to measure KL to.")
_MAX_TASKS = flags.DEFINE_integer("max_tasks", 256, "The first N tasks or pairs; 0: all.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per answer at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampled accuracy and KL; 0 skips them.")
_TEMPLATE = flags.DEFINE_string("chat_template", "", "jaxlm | chatml | llama3 | hf; default: "
                                "the run's, or hf for a HF directory with one.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Rows per generation or perplexity batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Perplexity row length.")
_LM_EVAL_TASKS = flags.DEFINE_string("lm_eval_tasks", "", "lm-evaluation-harness tasks, "
                                     "comma-separated (needs lm_eval: the eval extra).")
_LM_EVAL_INCLUDE = flags.DEFINE_string("lm_eval_include", "", "A folder of lm_eval task "
                                       "YAML files (lm_eval's --include_path).")
_LM_EVAL_DTYPE = flags.DEFINE_string("lm_eval_dtype", "", "Compute dtype for the lm_eval "
                                     "tasks; default the model's own.")
_LM_EVAL_LIMIT = flags.DEFINE_integer("lm_eval_limit", 0, "The first N documents of each "
                                      "lm_eval task; 0: all.")
_LM_EVAL_FEWSHOT = flags.DEFINE_integer("lm_eval_num_fewshot", -1, "Few-shot examples per "
                                        "lm_eval prompt; -1: each task's own.")
flags.mark_flags_as_required(["model", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  console.quiet()  # orbax's INFO lines and async tracebacks, unless --verbosity
  from jaxlm import evaluate  # pylint: disable=import-outside-toplevel
  from jaxlm.config import base_config  # pylint: disable=import-outside-toplevel
  from jaxlm.errors import ConfigError
  e = base_config().eval
  e.update(model=_MODEL.value, tasks=_TASKS.value, text=_TEXT.value, pairs=_PAIRS.value,
           reward_model=_REWARD_MODEL.value, baseline=_BASELINE.value,
           reference=_REFERENCE.value, max_tasks=_MAX_TASKS.value,
           max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
           chat_template=_TEMPLATE.value, batch_size=_BATCH.value, seq_len=_SEQ_LEN.value,
           lm_eval_tasks=_LM_EVAL_TASKS.value, lm_eval_include=_LM_EVAL_INCLUDE.value,
           lm_eval_limit=_LM_EVAL_LIMIT.value, lm_eval_num_fewshot=_LM_EVAL_FEWSHOT.value,
           lm_eval_dtype=_LM_EVAL_DTYPE.value)
  errors = evaluate.section_errors(e)
  if errors:
    print(f"error: {errors[0]}", file=sys.stderr)
    sys.exit(2)
  out = _OUT.value
  try:
    result = evaluate.evaluate(e, _MODEL.value, out)
  except (ConfigError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result["metrics"], indent=2))
  print(f"wrote {os.path.join(out, evaluate.EVAL_FILE)} and {evaluate.SAMPLES_FILE}",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
