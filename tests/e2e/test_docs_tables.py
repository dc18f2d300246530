"""The documents' generated tables equal their results files, and a table whose code
changed after the commit it measured is marked stale (tools/docs_tables.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("docs_tables",
                                               os.path.join(ROOT, "tools", "docs_tables.py"))
docs_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs_tables)


def test_readme_and_benchmarks_tables_equal_their_results_files():
  result = subprocess.run([sys.executable, "tools/docs_tables.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def _git(root, *args):
  subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                 env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                      "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def test_a_changed_number_fails_and_changed_code_marks_the_table_stale(tmp_path):
  (tmp_path / "r.json").write_text(json.dumps([{"preset": "tiny", "tokens_per_s": 1234.5,
                                                "mfu": 0.5, "overrides": ["a=1"]}]))
  (tmp_path / "model.py").write_text("x = 1\n")
  _git(tmp_path, "init", "-q")
  _git(tmp_path, "add", ".")
  _git(tmp_path, "commit", "-qm", "measured")
  commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  head = (f'<!-- results files="r.json" columns="preset=preset|tokens/s=tokens_per_s:,.0f|'
          f'MFU=mfu:.1%|set=overrides" commit={commit} depends="model.py" -->\n')
  right = ("| preset | tokens/s | MFU | set |\n|---|---|---|---|\n"
           "| tiny | 1,234 | 50.0% | `a=1` |\n")
  doc = f"text\n{head}{right}<!-- /results -->\nmore\n"
  assert docs_tables.render(doc, "D.md", str(tmp_path)) == (doc, [])
  edited = doc.replace("1,234", "1,300")  # a number typed by hand
  new, problems = docs_tables.render(edited, "D.md", str(tmp_path))
  assert new == doc and problems == ["D.md:2: the table differs from r.json"]
  (tmp_path / "model.py").write_text('"""The model."""\n\n# one\nx = 1  # the same code\n')
  _git(tmp_path, "commit", "-qam", "comments and a docstring")  # not stale: same code
  assert docs_tables.render(doc, "D.md", str(tmp_path)) == (doc, [])
  (tmp_path / "model.py").write_text("x = 2\n")  # the code it measured changes
  _git(tmp_path, "commit", "-qam", "faster")
  new, problems = docs_tables.render(doc, "D.md", str(tmp_path))
  assert problems == ["D.md:2: the table differs from r.json (stale, not marked)"]
  assert f"{docs_tables.STALE} model.py changed after commit {commit} (in model.py)" in new
  assert docs_tables.render(new, "D.md", str(tmp_path))[1] == []  # marked: passes


def test_a_region_without_its_files_is_one_line():
  with pytest.raises(ValueError, match=r"^D.md:1: a results table needs files="):
    docs_tables.render('<!-- results columns="a=a" -->\n<!-- /results -->', "D.md")


def test_a_turned_table_has_a_column_per_record(tmp_path):
  (tmp_path / "report.json").write_text(json.dumps(
      {"stages": {"base": {"acc": 0.0}, "sft": {"acc": 0.25, "n": 3}}}))
  spec = docs_tables._spec('files="report.json" select=stages keys="base sft" corner=held-out '
                           'columns="accuracy=acc:.3f|count=n"', "D.md")
  assert docs_tables.table(spec, str(tmp_path)) == (
      "| held-out | base | sft |\n|---|---|---|\n| accuracy | 0.000 | 0.250 |\n"
      "| count |  | 3 |\n")
