"""The one logger (jaxlm.console): which stream each level reaches, in which words, and
that lines are written around an open progress bar rather than through it."""

import logging
import sys

from tqdm import tqdm

from jaxlm import console


def test_levels_reach_their_streams(capsys):
  console.info("step 3/10 | loss 2.0000")
  console.warning("metrics.jsonl:4: dropped a record cut short")
  console.error("config error: model.d_model: not an int")
  out, err = capsys.readouterr()
  assert out == "step 3/10 | loss 2.0000\n"
  assert err == ("warning: metrics.jsonl:4: dropped a record cut short\n"
                 "config error: model.d_model: not an int\n")


def test_a_module_logger_goes_through_the_same_handler_once(capsys):
  logging.getLogger("jaxlm.data.sources").warning("a.jsonl:2: skipped")
  out, err = capsys.readouterr()
  assert (out, err) == ("", "warning: a.jsonl:2: skipped\n")


def test_percent_signs_are_text_not_format_fields(capsys):
  console.info("mfu 57.0% of peak")
  assert capsys.readouterr().out == "mfu 57.0% of peak\n"


def test_a_line_clears_an_open_bar_and_draws_it_again(capsys):
  bar = tqdm(total=4, file=sys.stderr, ascii=True, mininterval=0)
  bar.update(1)
  capsys.readouterr()
  console.info("resumed from ckpt/2")
  out, err = capsys.readouterr()
  bar.close()
  assert out == "resumed from ckpt/2\n"
  assert err.startswith("\r") and "1/4" in err  # the bar wiped, then drawn again
