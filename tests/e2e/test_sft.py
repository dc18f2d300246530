"""SFT: formats, templates, response-only loss, packing isolation, bad input, a real run."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import bpe_tokenizer, small_config, small_model, word_tokenizer
from jaxlm import model, tasks
from jaxlm.errors import ConfigError
from jaxlm.data import sft, sources, tokenizer
from jaxlm.tasks import common

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Green."}]},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"prompt": "The sky is", "completion": " blue."},
    {"prompt": [{"role": "user", "content": "Hi"}],
     "completion": [{"role": "assistant", "content": "Hello there."}]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return word_tokenizer(tmp_path_factory.mktemp("tok"), "the sky is blue green name a colour "
                        "another add numbers hello there be brief")


def supervised_text(record, tok, template="jaxlm"):
  turns = sft.to_turns(record, "auto")
  ids, sup = sft.tokenize(*turns, tok, sft.TEMPLATES[template], "completion")
  return tok.decode(ids[sup]), tok.decode(ids)


def test_formats_and_response_only_masks(tok):
  sup, full = supervised_text(CHATS[0], tok)
  assert sup == "Blue.<|end|>\nGreen.<|end|>\n"
  assert full.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nName a colour.")
  sup, full = supervised_text(CHATS[1], tok)
  assert sup == "5<|end|>\n"
  assert full == "<|user|>\nAdd the numbers.\n\n2 and 3<|end|>\n<|assistant|>\n5<|end|>\n"
  assert supervised_text(CHATS[2], tok) == ("blue.", "The sky is blue.")  # BOS, EOS decode to ""
  turns = sft.to_turns(CHATS[2], "auto")
  ids, mask = sft.tokenize(*turns, tok, sft.TEMPLATES["jaxlm"], "completion")
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1]  # it learns to stop
  assert supervised_text(CHATS[3], tok)[0] == "Hello there.<|end|>\n"
  ids, mask = sft.tokenize(*turns, tok, sft.TEMPLATES["jaxlm"], "all")
  assert mask.all()
  sup, full = supervised_text({"text": "The sky is blue."}, tok)  # TRL's language modeling
  assert sup == full == "The sky is blue."


def test_role_markers_are_single_tokens_or_an_error(tok):
  sft.check_template(sft.TEMPLATES["jaxlm"], tok)
  with pytest.raises(ConfigError, match="data.chat_template='chatml': '<|im_start|>' is not "
                                        "one token"):
    sft.check_template(sft.TEMPLATES["chatml"], tok)


def test_loss_ignores_prompt_targets(tok):
  cfg = small_model(vocab_size=384, dtype="float32")
  params = model.init(cfg, jax.random.PRNGKey(0))
  ex = sft.load_examples([_write(tmp_jsonl := _tmp("a.jsonl"), [CHATS[0]])], tok,
                         sft.TEMPLATES["jaxlm"], fmt="auto", seq_len=64, loss_on="completion",
                         truncation="truncate", on_error="raise").examples[0]
  os.remove(tmp_jsonl)
  row = sft._pad_row(ex, 64)
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  loss_fn = common.lm_loss_fn(cfg, 0.0, None)
  loss, _ = loss_fn(params, batch, None)
  scrambled = np.where(row["loss_mask"] == 0, (row["targets"] + 7) % 300, row["targets"])
  loss2, _ = loss_fn(params, {**batch, "targets": jnp.asarray(scrambled)[None]}, None)
  assert float(loss) == float(loss2)
  response = np.where(row["loss_mask"] == 1, (row["targets"] + 7) % 300, row["targets"])
  loss3, _ = loss_fn(params, {**batch, "targets": jnp.asarray(response)[None]}, None)
  assert float(loss3) != float(loss)


def test_packed_examples_do_not_see_each_other(tok, tmp_path):
  path = _write(tmp_path / "c.jsonl", CHATS)
  examples = sft.load_examples([path], tok, sft.TEMPLATES["jaxlm"], fmt="auto", seq_len=96,
                               loss_on="completion", truncation="truncate",
                               on_error="raise").examples
  packed = next(iter(sft.sft_dataset(examples, seq_len=96, batch_size=1, seed=0, shuffle=False,
                                     packing=True)))
  assert packed["segment_ids"].max() >= 2  # several examples share the row
  cfg = small_model(vocab_size=384, dtype="float32")
  params = model.init(cfg, jax.random.PRNGKey(1))
  logits = model.forward(params, jnp.asarray(packed["tokens"]), cfg,
                         segment_ids=jnp.asarray(packed["segment_ids"]),
                         positions=jnp.asarray(packed["positions"]))[0]
  seg = packed["segment_ids"][0]
  for s in range(1, seg.max() + 1):
    idx = np.flatnonzero(seg == s)
    alone = model.forward(params, jnp.asarray(packed["tokens"][0, idx])[None], cfg)[0]
    np.testing.assert_allclose(logits[idx], alone, atol=2e-5)
    np.testing.assert_array_equal(packed["positions"][0, idx], np.arange(idx.size))


def test_bad_records_raise_or_are_counted(tok, tmp_path):
  lines = [json.dumps(CHATS[1]), "{oops", json.dumps({"instruction": "x"}),
           json.dumps({"instruction": "x", "output": 3}), json.dumps({**CHATS[1], "output": " "}),
           json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
           json.dumps({"prompt": "long " * 200, "completion": "cut away"})]
  path = tmp_path / "bad.jsonl.gz"
  with gzip.open(path, "wb") as f:
    f.write(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff", "completion": "x"}\n')
  kwargs = dict(fmt="auto", seq_len=48, loss_on="completion", truncation="truncate")
  with pytest.raises(sft.DataError, match=f"{path}:2: invalid_json"):
    sft.load_examples([str(path)], tok, sft.TEMPLATES["jaxlm"], on_error="raise", **kwargs)
  ex = sft.load_examples([str(path)], tok, sft.TEMPLATES["jaxlm"], on_error="skip", **kwargs)
  assert ex.counts == {"records": 8, "used": 1, "skipped_invalid_json": 1,
                       "skipped_missing_field": 1, "skipped_wrong_type": 1,
                       "skipped_empty_response": 1, "skipped_no_assistant_turn": 1,
                       "dropped_truncated_away": 1, "skipped_decode_error": 1}
  assert ex.first["dropped_truncated_away"] == f"{path}:7"
  assert ex.first["decode_error"] == f"{path}:8"
  assert ("8 records, 1 used, 6 skipped, 0 truncated, 1 dropped as too long"
          in sources.summary("d", ex))


def test_json_list_files_report_lines(tok, tmp_path):
  path = tmp_path / "list.json"
  path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"},\n'
                  '  {"instruction": "d", "output": "e"}\n]\n')
  ex = sft.load_examples([str(path)], tok, sft.TEMPLATES["jaxlm"], fmt="auto", seq_len=48,
                         loss_on="completion", truncation="truncate", on_error="skip")
  assert ex.counts["used"] == 2 and ex.first["missing_field"] == f"{path}:3"


@pytest.mark.slow  # fast sibling: the real-data pipeline's SFT stage on Alpaca
def test_sft_on_alpaca_lowers_held_out_loss(shared_data, tmp_path):
  with open(os.path.join(shared_data, "alpaca_5000.json"), encoding="utf-8") as f:
    records = json.load(f)
  (tmp_path / "train.json").write_text(json.dumps(records[:4000]))
  (tmp_path / "eval.json").write_text(json.dumps(records[4500:4700]))
  tok_path = tmp_path / "tok.model"
  tokenizer.train((r["instruction"] + " " + r["output"] for r in records[:2000]), str(tok_path),
                  1024)
  config = small_config(**{"task": "sft", "data.train": str(tmp_path / "train.json"),
                           "data.eval": str(tmp_path / "eval.json"),
                           "data.tokenizer": str(tok_path), "data.seq_len": 128,
                           "steps": 40, "eval_every": 10, "eval_steps": 2,
                           "data.on_error": "skip",
                           "checkpoint_every": 40})
  tasks.run(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert evals[-1] < evals[0] - 0.3, evals
  assert records[0]["data/train_records"] == 4000 and "data/eval_used" in records[0]
  assert all("mean_token_accuracy" in r for r in records if "loss" in r)


def _tmp(name):
  import tempfile
  return os.path.join(tempfile.mkdtemp(), name)


def _write(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


CHATML_JINJA = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
                "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  """A real tokenizer.json (byte-level BPE) with ChatML markers and a Jinja template."""
  return bpe_tokenizer(tmp_path_factory.mktemp("hf_tok"),
                       ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                       [json.dumps(c) for c in CHATS] * 20,
                       {"eos_token": "<|im_end|>", "bos_token": None,
                        "pad_token": "<|endoftext|>", "chat_template": CHATML_JINJA})


def test_hf_jinja_template_renders_like_transformers_and_masks_responses(hf_tokenizer):
  transformers = pytest.importorskip("transformers")
  tok = tokenizer.load(hf_tokenizer)
  template = sft.hf_template(hf_tokenizer)
  turns = sft.to_turns(CHATS[0], "auto")
  ids, sup = sft.tokenize(*turns, tok, template, "completion")
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=hf_tokenizer,
                                                 chat_template=CHATML_JINJA)
  rendered = theirs.apply_chat_template(CHATS[0]["messages"], tokenize=False)
  assert tok.decode(ids[1:]) == rendered  # BOS first, then exactly transformers' text
  assert tok.decode(ids[sup]) == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
  with pytest.raises(ConfigError, match="data.chat_template='hf': no chat_template in"):
    sft.hf_template(str(tmp_dir := _tmp("t.json")))
  del tmp_dir


def test_a_run_keeps_only_the_tokenizer_it_uses(tmp_path):
  """HF models ship tokenizer.model and tokenizer.json; later stages read the workdir's,
  so it holds just the one the run encoded with, with the files that go with it."""
  src = tmp_path / "hf"
  src.mkdir()
  for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
    (src / name).write_text(name)
  for used, gone in (("tokenizer.json", "tokenizer.model"), ("tokenizer.model", "tokenizer.json")):
    workdir = tmp_path / f"run_{used}"
    common.keep_tokenizer(type("Tok", (), {"path": str(src / used)})(), str(workdir))
    assert sorted(os.listdir(workdir)) == sorted([used, "tokenizer_config.json"]), gone
