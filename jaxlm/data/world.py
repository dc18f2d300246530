"""A procedurally generated task world: small problems with verifiable numeric answers.

The tiny pipeline (configs/pipeline_tiny.py) needs data on which every stage's effect
shows at a size that trains on a laptop CPU in minutes. Five kinds of problem:

    add     What is 3 + 4?                         3 + 4 = 7
    sub     Subtract 2 from 9.                     9 - 2 = 7
    next    What number comes after 41?            41 + 1 = 42
    max     Which is the largest of 3, 8 and 5?    max(3, 8, 5) = 8
    count   How many items are in [red, sun, cat]? len([red, sun, cat]) = 3

The *facts* (the right-hand column) fill the pretraining text, so a base model knows
them but has never seen an instruction. A *demonstration* answers an instruction with
the fact and a final line `#### N` (GSM8K's answer line; `jaxlm.rewards` and the
evaluator read it). Like real instruction data, the demonstrations are imperfect: 10%
state a wrong result, 10% leave out the `####` line, and the counting answers never
have it. Preference pairs prefer
the correct, well-formed answer over a sloppy or wrong one, which is what the reward
model, DPO and RL stages learn and what the evaluation's strict answer match measures.

Problems are split by a hash of what they ask (kind and numbers, whatever the
phrasing): 1 in 10 is held out (`eval`) for the SFT, preference and RL data alike, so
no held-out problem is ever asked in training. The pretraining text is the world's
knowledge: facts of every problem, held-out ones too, as a real corpus holds the
arithmetic tables; its `eval` split is other documents of such facts. Everything is
deterministic in the seed.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import random
import warnings
import zlib

from jaxlm.fileio import write_jsonl


KINDS = ("add", "sub", "next", "max", "count")
WORDS = ("red", "sun", "cat", "dog", "tree", "box", "cup", "map", "hat", "pen", "egg", "key")
QUESTIONS = {
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "sub": ("What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}."),
    "next": ("What number comes after {a}?", "Count one up from {a}.",
             "What is the successor of {a}?"),
    "max": ("Which is the largest of {items}?", "What is the biggest number among {items}?",
            "Find the maximum of {items}."),
    "count": ("How many items are in [{items}]?", "Count the items in the list [{items}].",
              "How long is the list [{items}]?"),
}
# Share of demonstrations without the final `####` line, per kind: whoever wrote the
# counting answers never added it.
SLOPPY = {"add": 0.1, "sub": 0.1, "next": 0.1, "max": 0.1, "count": 1.0}
WRONG = 0.1    # share of demonstrations with a wrong result


def _and(xs) -> str:
  return ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"


def problem(rng: random.Random, kind: str) -> dict:
  """One problem: {"kind", "question", "fact" (the worked line, with {r} for the
  result), "answer"}."""
  if kind == "add":
    a, b = rng.randrange(10), rng.randrange(10)
    fields, fact, answer = dict(a=a, b=b), f"{a} + {b} = {{r}}", a + b
  elif kind == "sub":
    a = rng.randrange(20)
    b = rng.randrange(a + 1)
    fields, fact, answer = dict(a=a, b=b), f"{a} - {b} = {{r}}", a - b
  elif kind == "next":
    a = rng.randrange(100)
    fields, fact, answer = dict(a=a), f"{a} + 1 = {{r}}", a + 1
  elif kind == "max":
    xs = rng.sample(range(10), rng.randint(2, 4))
    fields = dict(items=_and(xs))
    fact, answer = f"max({', '.join(map(str, xs))}) = {{r}}", max(xs)
  elif kind == "count":
    xs = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    fields = dict(items=", ".join(xs))
    fact, answer = f"len([{', '.join(xs)}]) = {{r}}", len(xs)
  else:
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
  question = rng.choice(QUESTIONS[kind]).format(**fields)
  return {"kind": kind, "question": question, "fact": fact, "answer": answer}


def split_of(p: dict) -> str:
  """A problem's split, by what it asks (its fact: kind and numbers), whatever the
  phrasing: "Add 3 and 4." and "What is 3 + 4?" fall on the same side."""
  return "eval" if zlib.crc32(p["fact"].encode()) % 10 == 0 else "train"


def problems(seed: int, split: str, n: int) -> list[dict]:
  """Up to `n` problems of `split`, a fifth of each kind, interleaved; held-out ones
  are distinct (small kinds, like single-digit sums, may hold fewer)."""
  rng = random.Random(seed)
  per_kind = []
  for kind in KINDS:
    got, seen = [], set()
    for _ in range(100 * n):
      if len(got) == n // len(KINDS):
        break
      p = problem(rng, kind)
      if split_of(p) != split or (split == "eval" and p["question"] in seen):
        continue
      seen.add(p["question"])
      got.append(p)
    per_kind.append(got)
  return [p for group in itertools.zip_longest(*per_kind) for p in group if p is not None]


def answer_text(p: dict, *, well_formed: bool = True, result: int | None = None) -> str:
  """The response to a problem: its fact with `result` (default: the right one) and,
  when well formed, the final `#### N` line."""
  r = p["answer"] if result is None else result
  line = p["fact"].format(r=r)
  return f"{line}\n#### {r}" if well_formed else line


def wrong_result(rng: random.Random, p: dict) -> int:
  return max(0, p["answer"] + rng.choice((-2, -1, 1, 2))) if p["answer"] > 1 else \
      p["answer"] + rng.choice((1, 2))


def fact_documents(seed: int, n_docs: int, facts_per_doc: int = 24) -> list[str]:
  """Pretraining text: each document a run of facts of every kind, one per line, and
  a counting sequence (what `next` rests on)."""
  rng = random.Random(seed)
  docs = []
  for _ in range(n_docs):
    lines = [answer_text(problem(rng, rng.choice(KINDS)), well_formed=False)
             for _ in range(facts_per_doc)]
    start = rng.randrange(95)
    lines.insert(rng.randrange(len(lines)), ", ".join(str(i) for i in range(start, start + 6)))
    docs.append("\n".join(lines))
  return docs


# Sizes of each data kind and split; small enough to generate in a second.
SIZES = {"world_text": (1500, 100), "world_sft": (6000, 300), "world_pairs": (4000, 300),
         "world_prompts": (4000, 300)}
_SEEDS = {"world_text": 1, "world_sft": 2, "world_pairs": 3, "world_prompts": 4}


def _prose(n: int) -> list[str]:
  """Paragraphs of English from the standard library's module docstrings: the
  language around the facts."""
  paragraphs = []
  for name in ("json", "textwrap", "string", "shutil", "glob", "base64", "bisect", "heapq",
               "statistics", "random", "calendar", "difflib", "csv", "gzip", "copy",
               "functools", "itertools", "operator", "html", "fractions", "decimal", "datetime",
               "zipfile", "pprint", "tokenize", "secrets", "uuid", "hashlib", "hmac", "os",
               "collections", "pathlib", "argparse", "logging", "unittest", "configparser",
               "inspect", "ast", "typing", "enum", "dataclasses", "contextlib", "threading",
               "subprocess", "socket", "tarfile", "codecs", "locale", "traceback", "warnings",
               "queue", "doctest", "timeit", "abc", "io", "numbers", "struct", "types"):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except  # missing on this Python: skip it
      continue
    doc = inspect.cleandoc(module.__doc__ or "")
    paragraphs += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= 8]
  return paragraphs[:n]


def write(name: str, split: str, path: str) -> str:
  """Write the `split` of the world's data kind `name` to `path` (JSONL):

    world_text     {"text"}: pretraining documents, facts (and, in train, English prose)
    world_sft      {"messages"}: a user's question and the assistant's demonstration,
                   imperfect as described above
    world_pairs    {"prompt", "chosen", "rejected"}: correct and well formed over sloppy
                   (no `####` line; two in three) or wrong
    world_prompts  {"prompt", "answer", "kind"}: questions with their reference answers
                   (RL prompts; the evaluation's tasks)
  """
  train_n, eval_n = SIZES[name]
  n = train_n if split == "train" else eval_n
  seed = _SEEDS[name] * 2 + (split == "eval")
  rng = random.Random(seed)
  if name == "world_text":
    docs = fact_documents(seed, n)
    if split == "train":  # prose in the training text only: held-out text is facts
      docs += _prose(len(docs) // 3)
      rng.shuffle(docs)
    return write_jsonl(path, ({"text": d} for d in docs))
  ps = problems(seed, split, n)
  if name == "world_sft":
    def demo(p):
      if split == "eval":  # held-out demonstrations are the right answers
        return answer_text(p)
      wrong, sloppy = rng.random() < WRONG, rng.random() < SLOPPY[p["kind"]]
      return answer_text(p, result=wrong_result(rng, p) if wrong else None, well_formed=not sloppy)
    return write_jsonl(path, ({"messages": [{"role": "user", "content": p["question"]},
                                             {"role": "assistant", "content": demo(p)}]}
                               for p in ps))
  if name == "world_pairs":
    def rejected(i, p):
      if i % 3:
        return answer_text(p, well_formed=False)
      return answer_text(p, result=wrong_result(rng, p))
    return write_jsonl(path, ({"prompt": p["question"], "chosen": answer_text(p),
                                "rejected": rejected(i, p)} for i, p in enumerate(ps)))
  if name == "world_prompts":
    return write_jsonl(path, ({"prompt": p["question"], "answer": str(p["answer"]),
                                "kind": p["kind"]} for p in ps))
  raise ValueError(f"unknown world data {name!r}")


BUILTINS = tuple(SIZES)
