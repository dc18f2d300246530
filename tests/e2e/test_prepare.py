"""Corpus preparation: filters, PII, dedup, accounting, the tool, and mixtures in training."""

import filecmp
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import small_config
from jaxlm import tasks
from jaxlm.validate import config_errors as validate
from jaxlm.errors import ConfigError
from jaxlm.data import clean, dedup, lm, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("river stone garden window silver market winter candle harbor forest letter "
         "morning engine castle violet thunder meadow copper lantern orchard bridge "
         "whisper kettle falcon marble shadow ribbon anchor feather canyon").split()


def prose(rng, n_words=120):
  """A document of sentences that passes every quality filter."""
  sentences = []
  while sum(len(s.split()) for s in sentences) < n_words:
    words = list(rng.choice(WORDS, size=rng.integers(6, 14)))
    sentences.append(" ".join(words).capitalize() + ".")
  lines = [" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
  return "\n".join(lines)


def small_prepare_config(**sources):
  c = prepare.default_config()
  for name, src in sources.items():
    c.sources[name] = src
  c.workers = 1
  c.shards = 2
  c.tokenizer.vocab_size = 400
  return c


def read_stats(out):
  with open(os.path.join(out, "stats.json")) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------
# Cleaning


def test_normalize_nfc_controls_and_whitespace():
  s = prepare.default_config().normalize.to_dict()
  text = "Cafe\u0301 ok\x00\x07\r\nline two   \r\n\n\n\n\n    indented\t\n"
  assert clean.normalize(text, s) == "Caf\u00e9 ok\nline two\n\n    indented"


@pytest.mark.parametrize("name, text", [
    ("word_count", "Too short to keep."),
    ("mean_word_length", " ".join(["a b c d e f g h i j."] * 10)),
    ("symbol_ratio", " ".join(["# heading ... more words here."] * 20)),
    ("punctuation_lines", "\n".join(" ".join(WORDS[i:i + 8]) for i in range(20))),
    ("repeated_lines", "\n".join(["The same line comes back again and again."] * 10
                                 + ["A different closing line ends it all."] * 2)),
    ("repeated_ngrams", " ".join(["the river stone garden window."] * 25)),
    ("alpha_words", " ".join(["12 34 56 78 90 river."] * 20)),
])
def test_each_quality_filter_rejects_its_case_and_passes_prose(name, text):
  s = prepare.default_config().filters.to_dict()
  assert clean.first_failed_filter(text, (name,), s) == name
  good = prose(np.random.default_rng(0), 200)
  assert clean.first_failed_filter(good, tuple(clean.FILTERS), s) is None


def test_pii_scrubbing_replaces_planted_addresses_and_numbers_only():
  text = ("Write to jane.doe@example.com or j_smith+news@mail.co.uk today. Call +1 415 555 0132, "
          "(212) 555-0199 or +44 20 7946 0958. The server 192.168.10.254 and 8.8.8.8 answered. "
          "In 2021 the price was $1,234.56 on 2021-10-12; version 3.11 and 999.1.1.1 stay.")
  out, counts = clean.scrub_pii(text, {"email": "<E>", "phone": "<P>", "ip": "<I>"})
  assert counts == {"email": 2, "phone": 3, "ip": 2}
  for planted in ("jane.doe@", "j_smith", "415 555", "555-0199", "7946", "192.168", "8.8.8.8"):
    assert planted not in out
  for kept in ("2021", "$1,234.56", "2021-10-12", "version 3.11", "999.1.1.1"):
    assert kept in out
  assert out.count("<E>") == 2 and out.count("<P>") == 3 and out.count("<I>") == 2


def test_minhash_estimates_jaccard():
  rng = np.random.default_rng(1)
  perms = dedup.permutations(256, 0)
  a = prose(rng, 400)
  words = a.split()
  b = " ".join(words[: len(words) // 2] + list(rng.choice(WORDS, size=len(words) // 2)))
  sa, sb = dedup.shingles(a, 3), dedup.shingles(b, 3)
  true = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
  estimate = np.mean(dedup.minhash(a, 3, perms) == dedup.minhash(b, 3, perms))
  assert abs(estimate - true) < 0.08


# ---------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  """A JSONL corpus with planted duplicates and bad records, and a text source."""
  root = tmp_path_factory.mktemp("planted")
  rng = np.random.default_rng(0)
  distinct = [prose(rng, 200) for _ in range(40)]
  lines = [json.dumps({"text": d}) for d in distinct]
  edited = []
  for d in distinct[:5]:  # near duplicates: a couple of words changed
    words = d.split(" ")
    for i in rng.choice(len(words), size=2, replace=False):
      words[i] = "zebra"
    edited.append(" ".join(words))
  lines += [json.dumps({"text": e}) for e in edited]
  lines.append(json.dumps({"text": distinct[7]}))          # exact duplicate
  lines.append("{broken json")                               # line 47
  lines.append(json.dumps({"body": "no text field"}))        # line 48
  lines.append(json.dumps({"text": 12}))                     # line 49
  lines.append(json.dumps({"text": "   "}))                  # line 50
  lines.append(json.dumps({"text": "Too short."}))           # line 51
  raw = "\n".join(lines).encode() + b'\n{"text": "bad \xff\xfe bytes here"}\n'  # line 52
  with gzip.open(root / "web.jsonl.gz", "wb") as f:
    f.write(raw)
  text_dir = root / "books"
  text_dir.mkdir()
  (text_dir / "a.txt").write_text("\n\n".join(prose(rng, 80) for _ in range(6)))
  first = prose(rng, 80)
  (text_dir / "b.txt").write_bytes(first.encode() + b"\n\nbroken \xc3\x28 utf8\n")
  return root, distinct, first.count("\n") + 3  # the line the broken paragraph starts on


def test_stats_account_for_every_document(planted, tmp_path):
  root, _, broken_line = planted
  c = small_prepare_config(
      web=prepare.source_config(str(root / "web.jsonl.gz"), weight=3.0),
      books=prepare.source_config(str(root / "books"), text_split="paragraph"))
  stats = prepare.prepare(c, str(tmp_path / "out"), progress=False)
  assert stats == read_stats(tmp_path / "out")
  web = stats["web"]
  assert web["read"] == 52
  assert web["removed"] == {"exact_duplicate": 1, "near_duplicate": 5, "invalid_json": 1,
                            "missing_field": 1, "wrong_type": 1, "empty": 1, "word_count": 1,
                            "decode_error": 1}
  assert web["kept"] == 40
  path = str(root / "web.jsonl.gz")
  assert web["first_at"]["invalid_json"] == f"{path}:47"
  assert web["first_at"]["decode_error"] == f"{path}:52"
  books = stats["books"]
  assert books["read"] == 8 and books["kept"] == 7
  assert books["removed"] == {"decode_error": 1}
  assert books["first_at"]["decode_error"] == f"{root / 'books' / 'b.txt'}:{broken_line}"
  for s in (web, books, stats["total"]):
    assert s["read"] == s["kept"] + sum(s["removed"].values())
    assert set(s) >= {"read", "kept", "removed", "chars", "tokens"}
  assert stats["total"]["read"] == 60 and stats["total"]["kept"] == 47
  manifest = prepare.read_manifest(str(tmp_path / "out"))
  assert manifest["sources"]["web"]["weight"] == 3.0
  assert manifest["sources"]["web"]["splits"]["train"]["tokens"] == web["tokens"] > 0
  assert os.path.exists(tmp_path / "out" / "tokenizer.vocab")


def test_near_duplicates_caught_and_distinct_documents_kept(planted, tmp_path):
  root, distinct, _ = planted
  c = small_prepare_config(web=prepare.source_config(str(root / "web.jsonl.gz")))
  prepare.prepare(c, str(tmp_path), progress=False)
  import io
  buf = io.StringIO()
  assert prepare.show(str(tmp_path), out=buf) == 40
  shown = buf.getvalue()
  assert "zebra" not in shown  # every edited copy was removed
  for d in distinct:
    assert d.split("\n")[0] in shown  # every distinct document survived


def test_on_error_fail_and_decode_repair(planted, tmp_path):
  root = planted[0]
  path = str(root / "web.jsonl.gz")
  c = small_prepare_config(web=prepare.source_config(path))
  c.on_error = "fail"
  with pytest.raises(ValueError, match=f"{path}:47: invalid_json"):
    prepare.prepare(c, str(tmp_path / "fail"), progress=False)
  c = small_prepare_config(books=prepare.source_config(str(root / "books" / "b.txt"),
                                                       text_split="paragraph", filters="none"))
  c.on_decode_error = "repair"
  stats = prepare.prepare(c, str(tmp_path / "repair"), progress=False)
  assert stats["books"]["kept"] == 2 and stats["books"]["repaired"] == 1


def test_exact_and_near_dedup_are_deterministic_across_workers(planted, tmp_path, monkeypatch):
  root = planted[0]
  monkeypatch.setattr(prepare, "CHUNK", 4)  # many small tasks: both workers take turns
  results = []
  for workers in (1, 2):
    c = small_prepare_config(web=prepare.source_config(str(root / "web.jsonl.gz")))
    c.workers = workers
    prepare.prepare(c, str(tmp_path / str(workers)), progress=False)
    results.append(read_stats(tmp_path / str(workers))["web"])
  assert results[0] == results[1]


def test_parquet_source_counts_bad_rows(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(5)
  texts = [prose(rng) for _ in range(6)] + [None]
  pq.write_table(pa.table({"content": texts}), tmp_path / "part.parquet")
  c = small_prepare_config(p=prepare.source_config(str(tmp_path / "part.parquet"),
                                                   text_field="content"))
  stats = prepare.prepare(c, str(tmp_path / "out"), progress=False)["p"]
  assert stats["read"] == 7 and stats["kept"] == 6
  assert stats["first_at"]["missing_field"] == f"{tmp_path / 'part.parquet'}:row 7"
  c.sources.p.text_field = "text"
  with pytest.raises(ConfigError, match="text_field='text': no such column in .*columns: "
                                        "content"):
    prepare.prepare(c, str(tmp_path / "out2"), progress=False)


def test_config_problems_name_the_key(tmp_path):
  c = small_prepare_config(web=prepare.source_config(str(tmp_path / "none*.jsonl")))
  with pytest.raises(ConfigError, match=r"sources.web.path: no file matches"):
    prepare.prepare(c, str(tmp_path / "o"), progress=False)
  c = small_prepare_config(web=prepare.source_config("x", filters="word_count,shouting"))
  with pytest.raises(ConfigError, match="sources.web.filters='word_count,shouting': unknown "
                                        "filter 'shouting'"):
    prepare.prepare(c, str(tmp_path / "o"), progress=False)


# ---------------------------------------------------------------------------------------
# Training reads it


@pytest.fixture(scope="module")
def mix_corpus(tmp_path_factory):
  """Two sources with very different document lengths, and a held-out split."""
  root = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(3)
  for name, n_docs, n_words in (("long", 60, 400), ("short", 400, 40)):
    with open(root / f"{name}.jsonl", "w") as f:
      for i in range(n_docs):
        f.write(json.dumps({"text": f"{name} {i}. " + prose(rng, n_words)}) + "\n")
  c = small_prepare_config(
      long=prepare.source_config(str(root / "long.jsonl"), weight=0.75, filters="none"),
      short=prepare.source_config(str(root / "short.jsonl"), weight=0.25, filters="none"))
  c.dedup.near = False
  c.eval_fraction = 0.1
  out = str(root / "prepared")
  prepare.prepare(c, out, progress=False)
  return out


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_mixture_proportions_are_token_shares(mix_corpus):
  weights = lm.mixture_weights(prepare.read_manifest(mix_corpus), "", "train", "data.train")
  assert weights == {"long": 0.75, "short": 0.25}
  data = lm.mixture_dataset(mix_corpus, "train", weights, seq_len=64, batch_size=8, seed=0,
                            shuffle=True, repeat=True)
  it = iter(data)
  _batches(it, 100)
  consumed = it.consumed_tokens()
  share = consumed["long"] / sum(consumed.values())
  assert abs(share - 0.75) < 0.02, consumed
  assert sum(consumed.values()) == 100 * 8 * 64


def test_mixed_iterator_resumes_exactly(mix_corpus):
  weights = {"long": 0.5, "short": 0.5}
  make = lambda: iter(lm.mixture_dataset(mix_corpus, "train", weights, seq_len=32,  # noqa: E731
                                         batch_size=4, seed=1, shuffle=True, repeat=True,
                                         prefetch=2))
  uninterrupted = make()
  full = _batches(uninterrupted, 30)
  first = make()
  _batches(first, 12)
  state = json.loads(json.dumps(first.get_state()))  # through JSON, as checkpoints store it
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(full[12:], _batches(resumed, 18)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert resumed.consumed_tokens() == uninterrupted.consumed_tokens()


def test_processes_read_disjoint_documents(mix_corpus):
  seen = []
  for pid in range(2):
    data = lm.mixture_dataset(mix_corpus, "train", {"short": 1.0}, seq_len=256, batch_size=2,
                              seed=0, shuffle=False, repeat=False, process_index=pid,
                              process_count=2)
    ids = np.concatenate([np.concatenate([t, g[-1:]])  # whole packed rows: inputs + last target
                          for b in data for t, g in zip(b["tokens"], b["targets"])])
    seen.append(ids)
  from jaxlm.data.tokenizer import Tokenizer
  tok = Tokenizer(os.path.join(mix_corpus, "tokenizer.model"))
  docs = [set(int(t.split(".")[0]) for t in tok.decode(s).split("short ")[1:]
              if t.split(".")[0].isdigit()) for s in seen]
  assert docs[0] and docs[1] and not docs[0] & docs[1], sorted(docs[0] & docs[1])


def test_mixture_errors_name_the_key(mix_corpus):
  corpus = prepare.read_manifest(mix_corpus)
  with pytest.raises(ConfigError, match="data.mixture: no source 'web' in data.train; it has "
                                        "long, short"):
    lm.mixture_weights(corpus, "web=1", "train", "data.train")
  errors = validate(small_config(**{"data.train": mix_corpus, "data.mixture": "long:0.5"}), 8)
  assert any("data.mixture='long:0.5': expected name=weight" in e for e in errors), errors
  assert validate(small_config(**{"data.train": mix_corpus, "data.eval": mix_corpus}), 8) == []


def test_pretraining_on_a_prepared_mixture(mix_corpus, tmp_path):
  config = small_config(**{"data.train": mix_corpus, "data.eval": mix_corpus,
                           "data.mixture": "long=0.5,short=0.5", "steps": 6, "eval_every": 6,
                           "checkpoint_every": 3})
  tasks.run(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  final = records[-1]
  assert final["step"] == 6
  assert final["tokens_consumed/long"] + final["tokens_consumed/short"] == 6 * 8 * 32
  assert any("eval_loss" in r for r in records)
  # The corpus's tokenizer is used, and kept in the workdir.
  assert filecmp.cmp(tmp_path / "tokenizer.model", os.path.join(mix_corpus, "tokenizer.model"),
                     shallow=False)


def test_on_exhausted_stop_ends_the_run_with_a_checkpoint(mix_corpus, tmp_path):
  config = small_config(**{"data.train": mix_corpus, "data.mixture": "long=1",
                           "data.on_exhausted": "stop", "steps": 10_000, "eval_every": 0,
                           "data.seq_len": 128, "log_every": 100})
  tasks.run(config, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  split = prepare.read_manifest(mix_corpus)["sources"]["long"]["splits"]["train"]
  # One pass over the long source: its tokens plus BOS/EOS make full rows of 129 tokens
  # (and a last, partial one), and the rows make whole batches of 8.
  rows = (split["tokens"] + 2 * split["documents"]) / 129
  assert steps[-1] in (int(rows) // 8, (int(rows) + 1) // 8), (steps, rows)


def test_prepare_tool_quick_mode_and_show(planted, tmp_path):
  root = planted[0]
  out = tmp_path / "quick"
  cmd = [sys.executable, "tools/prepare_data.py", "--input", str(root / "web.jsonl.gz"),
         "--input", str(root / "books"), "--output", str(out), "--vocab_size", "400"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "total" in result.stdout and "near_duplicate 5" in result.stdout
  stats = read_stats(out)
  assert set(stats) == {"web", "books", "total"}
  shown = subprocess.run([sys.executable, "tools/prepare_data.py", "--show", str(out), "--n",
                          "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0 and shown.stdout.count("=== ") == 2
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 2 and "already holds a prepared corpus" in again.stderr


def test_prepare_tool_bad_override_is_one_line():
  result = subprocess.run([sys.executable, "tools/prepare_data.py", "--config",
                           "configs/data/stdlib.py", "--output", "/tmp/jaxlm-never-written",
                           "--config.sources.modules.wieght=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == ("config error: --config.sources.modules.wieght: the config "
                                   "has no key 'wieght' (did you mean 'weight'?)")


def test_surrogates_and_truncated_files_are_counted_not_fatal(tmp_path):
  rng = np.random.default_rng(9)
  good = [json.dumps({"text": prose(rng)}) for _ in range(30)]
  lines = good[:3] + ['{"text": "lone \\ud800 surrogate"}'] + good[3:]
  full = gzip.compress(("\n".join(lines) + "\n").encode())
  (tmp_path / "cut.jsonl.gz").write_bytes(full[: len(full) * 2 // 3])
  c = small_prepare_config(s=prepare.source_config(str(tmp_path / "cut.jsonl.gz")))
  stats = prepare.prepare(c, str(tmp_path / "out"), progress=False)["s"]
  assert stats["removed"]["decode_error"] == 1
  assert stats["first_at"]["decode_error"] == f"{tmp_path / 'cut.jsonl.gz'}:4"
  assert stats["removed"]["read_error"] == 1
  assert stats["read"] == stats["kept"] + sum(stats["removed"].values())
  assert 3 <= stats["kept"] < 30


def test_show_prints_documents_in_written_order_and_overwrite_keeps_other_files(tmp_path):
  src = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(4)
  with open(src, "w") as f:
    for i in range(6):
      f.write(json.dumps({"text": f"Document number {i}. " + prose(rng)}) + "\n")
  c = small_prepare_config(d=prepare.source_config(str(src)))
  out = tmp_path / "out"
  prepare.prepare(c, str(out), progress=False)
  import io
  buf = io.StringIO()
  prepare.show(str(out), 4, out=buf)
  numbers = [int(line.split()[2].rstrip(".")) for line in buf.getvalue().splitlines()
             if line.startswith("Document number")]
  assert numbers == [0, 1, 2, 3]
  (out / "notes.txt").write_text("mine")
  prepare.prepare(c, str(out), overwrite=True, progress=False)
  assert (out / "notes.txt").read_text() == "mine"


def test_mixture_needs_a_prepared_corpus():
  errors = validate(small_config(**{"data.mixture": "a=1"}), 8)
  assert any("data.mixture: set, but data.train is not a prepared corpus" in e for e in errors)
