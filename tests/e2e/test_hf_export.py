"""Hugging Face exports used as they are: transformers loads the tokenizer without
sentencepiece, encodes, renders chats and generates greedily as jaxlm does; the files a
stranger reads (generation_config.json, modes); an imported HF tokenizer is kept."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import STDLIB, bpe_tokenizer, rule_records, small_config, write_jsonl
from jaxlm import hf_tokenizer, runs, sample, tasks
from jaxlm.data import sft, tokenizer as tokenizer_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Never in the tokenizer's training text (rule records and stdlib modules a-c).
HELD_OUT = [
    "", " ", "naïve café, 北京 and 😀 (ǅ) ∑x²", "    def parse(self, text):\n\treturn text\n",
    "a    b        c\t\td", "   three leading spaces", "\n\nafter two newlines\n", "trailing  \n ",
    "x = {'k': [1, 2.5e-3]}  # comment\r\n", "say <|user|> mid-text, then <|end|>.",
    open(os.path.join(STDLIB, "json", "decoder.py"), encoding="utf-8").read()[:600],
]
CONVERSATIONS = [
    [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue."),
     ("user", "Another?"), ("assistant", "Green.")],
    [("user", "  spaced\n\ncontent: 😀 and\n    x = 1"), ("assistant", " a leading space")],
    [("user", "Reply to: apple river stone")],
]
RAW_PROMPTS = ["Reply to: green quick", "def f(", "sure, "]
CHAT_PROMPTS = ["Reply to: apple river stone", "Reply to: honey north ocean", "Hello"]
NEW_TOKENS = 12

# Runs with only torch and transformers: sentencepiece (and jaxlm) can't be imported.
HF_SIDE = r'''
import json, sys
sys.modules["sentencepiece"] = None
class Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "jaxlm":
      raise ImportError(f"{name} is blocked here")
sys.meta_path.insert(0, Blocked())
import torch, transformers
spec = json.load(open(sys.argv[1]))
out = {"sentencepiece": transformers.utils.is_sentencepiece_available(), "templates": {}}

def chats(tok):
  rows = []
  for conv in spec["conversations"]:
    messages = [{"role": r, "content": c} for r, c in conv]
    row = {}
    for gen in (False, True):
      text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
      ids = ids["input_ids"] if hasattr(ids, "keys") else ids
      row[str(gen)] = {"text": text, "ids": list(ids),
                       "plain": tok.decode(ids, skip_special_tokens=True)}
    rows.append(row)
  return rows

for name, folder in spec["templates"].items():
  out["templates"][name] = chats(transformers.AutoTokenizer.from_pretrained(folder))
tok = transformers.AutoTokenizer.from_pretrained(spec["export"])
out["class"] = type(tok).__name__
out["bos_token"] = tok.bos_token
out["ids"] = [tok(s)["input_ids"] for s in spec["strings"]]
out["decoded"] = [tok.decode(ids, skip_special_tokens=True) for ids in out["ids"]]
model = transformers.AutoModelForCausalLM.from_pretrained(spec["export"], dtype=torch.float32)
def greedy(ids, **kw):
  x = torch.tensor([ids])
  y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                     max_new_tokens=spec["new_tokens"], **kw)
  return y[0, len(ids):].tolist()
# jaxlm continues plain text until EOS; a chat reply ends at EOS or the end of its turn
out["raw_prompts"] = [tok(p)["input_ids"] for p in spec["raw"]]
out["raw"] = [greedy(ids, eos_token_id=tok.eos_token_id) for ids in out["raw_prompts"]]
out["chat_prompts"], out["chat"] = [], []
for p in spec["chat"]:
  ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
  ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  out["chat_prompts"].append(ids)
  out["chat"].append(greedy(ids))
json.dump(out, open(sys.argv[2], "w"))
'''


def umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A tiny SFT run (its own SentencePiece model, with every template's markers), its
  export, tokenizer folders for each jaxlm template, and what transformers made of them."""
  d = tmp_path_factory.mktemp("hf_export")
  records = rule_records(300, 0)
  code = [open(f, encoding="utf-8").read() for f in sorted(glob.glob(f"{STDLIB}/[a-c]*.py"))[:30]]
  tok = tokenizer_lib.train([" ".join(r.values()) for r in records] + code, str(d / "sp.model"),
                            512, special_tokens=hf_tokenizer.ROLE_MARKERS)
  chats = [{"prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["chosen"]}]} for r in records]
  tasks.run(small_config(**{"task": "sft", "data.train": write_jsonl(d / "sft.jsonl", chats),
                            "data.eval": "", "data.tokenizer": str(d / "sp.model"),
                            "data.seq_len": 64, "steps": 30, "eval_every": 0,
                            "checkpoint_every": 30}), str(d / "run"))
  runs.export_hf(str(d / "run"), str(d / "out"))
  folders = {}
  for name in sft.TEMPLATES:
    folders[name] = str(d / f"tok_{name}")
    os.makedirs(folders[name])
    hf_tokenizer.write_sentencepiece(folders[name], tok, name, vocab_size=tok.vocab_size,
                                     max_len=64)
  spec = {"export": str(d / "out"), "strings": HELD_OUT, "conversations": CONVERSATIONS,
          "templates": folders, "raw": RAW_PROMPTS, "chat": CHAT_PROMPTS,
          "new_tokens": NEW_TOKENS}
  (d / "spec.json").write_text(json.dumps(spec))
  env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false"}
  result = subprocess.run([sys.executable, "-c", HF_SIDE, str(d / "spec.json"), str(d / "hf.json")],
                          capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return {"dir": d, "tok": tok, "hf": json.loads((d / "hf.json").read_text())}


def test_tokenizer_loads_without_sentencepiece_and_encodes_as_jaxlm(export):
  tok, got = export["tok"], export["hf"]
  assert got["sentencepiece"] is False and got["class"] in ("TokenizersBackend",
                                                            "PreTrainedTokenizerFast")
  for text, ids in zip(HELD_OUT, got["ids"]):
    assert ids == [tok.bos_id] + tok.encode(text), text  # BOS as jaxlm trains, no EOS
  for text, plain in zip(HELD_OUT, got["decoded"]):
    for marker in hf_tokenizer.ROLE_MARKERS:
      assert marker not in plain, (text, plain)


@pytest.mark.parametrize("name", list(sft.TEMPLATES))
def test_chat_templates_render_and_tokenize_as_jaxlm(export, name):
  tok, got = export["tok"], export["hf"]["templates"][name]
  template = sft.TEMPLATES[name]
  bos = export["hf"]["bos_token"]
  assert bos == tok.sp.id_to_piece(tok.bos_id)
  for conversation, row in zip(CONVERSATIONS, got):
    for gen in (False, True):
      parts = sft._chat_parts([(r, c, False) for r, c in conversation], tok, template, gen)
      # transformers and vLLM tokenize a rendered chat without adding BOS: it is in the text
      assert row[str(gen)]["text"] == bos + "".join(t for t, _, _ in parts), (name, gen)
      for marker in template.specials:
        assert marker not in row[str(gen)]["plain"]
      for _, content in conversation:
        assert content.strip() in row[str(gen)]["plain"]
    prompt = sft.prompt_ids(conversation, tok, template)
    assert row["True"]["ids"] == prompt.tolist(), name
    if conversation[-1][0] == "assistant":
      ids, _ = sft.tokenize([(r, c, r == "assistant") for r, c in conversation], True, tok,
                            template, "completion")
      assert row["False"]["ids"] == ids.tolist(), name


def test_jaxlm_reads_its_export_back_as_a_hf_tokenizer(export):
  tok, out = export["tok"], export["dir"] / "out"
  back = tokenizer_lib.load(str(out / "tokenizer.json"))
  assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  for text in HELD_OUT:
    assert back.encode(text) == tok.encode(text), text
  template = sft.hf_template(str(out / "tokenizer.json"))  # data.chat_template='hf'
  for conversation in CONVERSATIONS:
    messages = [{"role": r, "content": c} for r, c in conversation]
    for gen in (False, True):
      parts = sft._chat_parts([(r, c, False) for r, c in conversation], tok,
                              sft.TEMPLATES["jaxlm"], gen)
      assert sft._render(template, messages, gen) == "".join(t for t, _, _ in parts)
    assert (sft.prompt_ids(conversation, back, template).tolist()
            == sft.prompt_ids(conversation, tok, sft.TEMPLATES["jaxlm"]).tolist())
  assert sft._render(template, [{"role": "tool", "content": "x"}], False) is None  # refused


def test_greedy_generation_equals_jaxlm_sample(export):
  got = export["hf"]
  lm = runs.load_lm(str(export["dir"] / "run"))
  assert sample.TextSampler(lm, chat=False, max_new_tokens=1, temperature=0.0).engine.cfg.dtype \
      == "bfloat16"  # the model's own compute dtype unless asked
  for chat, prompts, hf_out in ((False, RAW_PROMPTS, got["raw"]),
                                (True, CHAT_PROMPTS, got["chat"])):
    sampler = sample.TextSampler(lm, chat=chat, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                 dtype="float32")
    assert sampler.engine.cfg.dtype == "float32"
    ids = [sampler.chat_ids([("user", p)]) if chat else sampler.text_ids(p) for p in prompts]
    assert [i.tolist() for i in ids] == got["chat_prompts" if chat else "raw_prompts"]
    out = sampler.engine.generate(lm.params, ids, jax.random.PRNGKey(0), sampler.sampling)
    for k, prompt in enumerate(prompts):
      assert out.tokens[k, :out.lengths[k]].tolist() == hf_out[k], (chat, prompt)
  end = lm.tokenizer.encode("<|end|>")[-1]
  assert any(row and row[-1] == end for row in got["chat"])  # a reply ended at its turn's end


def test_generation_config_and_file_modes(export):
  tok, out = export["tok"], export["dir"] / "out"
  gen = json.loads((out / "generation_config.json").read_text())
  end = tok.sp.piece_to_id("<|end|>")
  assert gen["eos_token_id"] == [tok.eos_id, end]
  assert gen["bos_token_id"] == tok.bos_id and gen["pad_token_id"] == tok.pad_id
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert config["add_bos_token"] is True and config["add_eos_token"] is False
  special = {t["content"] for t in config["added_tokens_decoder"].values() if t["special"]}
  assert set(sft.TEMPLATES["jaxlm"].specials) <= special
  expected = 0o666 & ~umask()
  for name in os.listdir(out):
    assert os.stat(out / name).st_mode & 0o777 == expected, name  # not tempfile's 0600


def test_an_imported_hf_tokenizer_keeps_its_files(tmp_path):
  specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
  config = {"eos_token": "<|im_end|>", "bos_token": None,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{{ m['content'] }}<|im_end|>\n{% endfor %}"}
  bpe_tokenizer(tmp_path, specials, [" ".join(r.values()) for r in rule_records(200, 0)], config)
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64)
  transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(tmp_path / "hf")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.replace(tmp_path / name, tmp_path / "hf" / name)
  own = {n: (tmp_path / "hf" / n).read_bytes() for n in os.listdir(tmp_path / "hf")
         if n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}
  assert len(own) == 3  # save_pretrained wrote a generation_config.json
  runs.import_hf(str(tmp_path / "hf"), str(tmp_path / "jx"))
  runs.export_hf(str(tmp_path / "jx"), str(tmp_path / "out"))
  for name, data in own.items():
    assert (tmp_path / "out" / name).read_bytes() == data, name
  assert not (tmp_path / "out" / "special_tokens_map.json").exists()
  # Without its own generation_config.json, one is added: generation ends at <|im_end|>.
  os.remove(tmp_path / "jx" / "generation_config.json")
  runs.export_hf(str(tmp_path / "jx"), str(tmp_path / "out"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "out" / name).read_bytes() == own[name], name
  tok = tokenizer_lib.load(str(tmp_path / "out" / "tokenizer.json"))
  gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [tok.eos_id] == [tok.tok.token_to_id("<|im_end|>")]
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert loaded("apple river")["input_ids"] == tok.encode("apple river")
