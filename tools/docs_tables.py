"""Tables in README.md and BENCHMARKS.md written from the results files commands wrote.

  python tools/docs_tables.py --check     # exit 1 naming each table that disagrees or is stale
  python tools/docs_tables.py --write     # rewrite the tables, mark stale ones

A generated table sits between two comments in the document:

  <!-- results files="benchmarks/x/a.json benchmarks/x/b.json"
       columns="preset=preset|tokens/s=tokens_per_s:,.0f|MFU=mfu:.1%"
       commit=77bc1be depends="jaxlm/model.py jaxlm/attention.py" -->
  | preset | tokens/s | MFU |
  ...
  <!-- /results -->

`files`: JSON results (a list of records, or one record), their rows in order; the key
`_file` is each row's file name. With `select=a.b` (one file) the table is turned: the
object at that path holds one record per column (`keys=` orders them, `corner=` heads
the label column), and each of `columns` is a row.
`columns`: `Header=key[:format]`, `|`-separated; `key*1000` scales a number first, a
format is Python's (`,.0f`, `.1%`) with any text after it kept (`:.2f GiB`), a list
value is joined with spaces, a missing one is empty. `commit`: the commit whose code the
results measured. `depends`: the files whose change changes what they measure. When one of them differs
from `commit`'s (the working tree against that commit; in a Python file, in its code,
not in its comments and docstrings alone), the table is stale: `--write` puts a line
saying so under it, and `--check` fails until the results are re-run (new files, a new
commit) or that line is there.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "BENCHMARKS.md")
# A region's comments start their lines (so prose can quote them inside backticks).
_REGION = re.compile(r"^(<!-- results (?P<spec>.*?)-->\n)(?P<body>.*?)^(<!-- /results -->)",
                     re.S | re.M)
STALE = "**Stale:**"


def _spec(text: str, where: str) -> dict:
  fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', text))
  spec = {k: v.strip('"') for k, v in fields.items()}
  for key in ("files", "columns"):
    if not spec.get(key):
      raise ValueError(f"{where}: a results table needs {key}=")
  return spec


def _cell(record: dict, column: str) -> str:
  key, _, fmt = column.partition(":")
  key, _, scale = key.partition("*")
  value = record.get(key)
  if value is None:
    return ""
  if isinstance(value, list):
    return " ".join(f"`{v}`" for v in value) or "defaults"
  if scale:
    value = value * float(scale)
  if not fmt:
    return str(value)
  number, space, suffix = fmt.partition(" ")
  return f"{value:{number}}{space}{suffix}"


def _turned(spec: dict, columns: list, root: str) -> str:
  (name,) = spec["files"].split()
  with open(os.path.join(root, name), encoding="utf-8") as f:
    data = json.load(f)
  for part in spec["select"].split("."):
    data = data[part]
  keys = spec.get("keys", " ".join(data)).split()
  lines = ["| " + " | ".join([spec.get("corner", ""), *keys]) + " |",
           "|" + "---|" * (len(keys) + 1)]
  lines += ["| " + " | ".join([label, *(_cell(data.get(k, {}), c) for k in keys)]) + " |"
            for label, c in columns]
  return "\n".join(lines) + "\n"


def table(spec: dict, root: str = ROOT) -> str:
  """The Markdown table a region's spec asks for, from its results files."""
  columns = [c.split("=", 1) for c in spec["columns"].split("|")]
  if spec.get("select"):
    return _turned(spec, columns, root)
  rows = []
  for name in spec["files"].split():
    with open(os.path.join(root, name), encoding="utf-8") as f:
      loaded = json.load(f)
    rows += [{"_file": os.path.basename(name), **r}
             for r in (loaded if isinstance(loaded, list) else [loaded])]
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r, c) for _, c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _code(source: str) -> str | None:
  """A Python file's code without its comments and docstrings (its AST), or None when
  it does not parse."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return None
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
      node.body = body[1:] or [ast.Pass()]
  return ast.dump(tree)


def _git(root: str, *args: str) -> str:
  return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                        timeout=30, check=True).stdout


def _code_changed(root: str, commit: str, path: str) -> bool:
  """Whether `path` differs between `commit` and the checkout in more than comments and
  docstrings (a file that is not Python: in anything)."""
  try:
    before = _git(root, "show", f"{commit}:{path}")
  except subprocess.CalledProcessError:  # added since
    return True
  full = os.path.join(root, path)
  if not os.path.isfile(full):
    return True
  with open(full, encoding="utf-8") as f:
    after = f.read()
  if not path.endswith(".py") or before == after:
    return before != after
  code = _code(before)
  return code is None or code != _code(after)


def stale_because(spec: dict, root: str = ROOT) -> str | None:
  """The files of `depends` whose code changed after `commit` (a change to comments or
  docstrings alone does not count), as a sentence; None when none did, or when git
  cannot tell (not a checkout, the commit unknown)."""
  if not spec.get("commit") or not spec.get("depends"):
    return None
  try:
    changed = _git(root, "diff", "--name-only", "-z", spec["commit"], "--",
                   *spec["depends"].split()).split("\0")
    changed = [p for p in changed if p and _code_changed(root, spec["commit"], p)]
  except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
    return None
  if not changed:
    return None
  return (f"{STALE} {spec['depends']} changed after commit {spec['commit']} (in "
          f"{', '.join(changed)}); re-run the command above and point `commit=` at the new "
          f"results.\n")


def render(text: str, path: str, root: str = ROOT) -> tuple[str, list[str]]:
  """(the document with every region regenerated and stale ones marked, what differed)."""
  problems = []

  def region(m):
    where = f"{path}:{text[:m.start()].count(chr(10)) + 1}"
    spec = _spec(m.group("spec"), where)
    body = table(spec, root)
    reason = stale_because(spec, root)
    if reason:
      body += "\n" + reason
    if m.group("body") != body:
      problems.append(f"{where}: the table differs from {spec['files']}"
                      + (" (stale, not marked)" if reason else ""))
    return m.group(1) + body + m.group(4)
  return _REGION.sub(region, text), problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--check", action="store_true")
  mode.add_argument("--write", action="store_true")
  args = parser.parse_args(argv)
  failed = []
  for name in DOCUMENTS:
    path = os.path.join(ROOT, name)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    new, problems = render(text, name)
    if args.write and new != text:
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
      os.replace(tmp, path)
      print(f"{name}: {len(problems)} table(s) rewritten")
    failed += problems
  if args.check and failed:
    print("\n".join(failed), file=sys.stderr)
    print(f"run: python {shlex.quote(os.path.relpath(__file__, ROOT))} --write", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
