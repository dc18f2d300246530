"""The command line's config flags: `--config FILE[:ARG]` and `--config.KEY=VALUE`
overrides, read here (not by ml_collections' config_flags), every problem one line
naming the flag, the key or the file.

    _CONFIG = cli.define_config_file("config", "Config file (configs/*.py[:arg]).")
    ...
    app.run(main, flags_parser=cli.parse_flags)   # then _CONFIG.value, .spec, .overrides

FILE is loaded as a module (registered as `config_config` in sys.modules, as ml_collections
does; its directory is not put on sys.path, as ml_collections does not) and
`get_config(ARG)` called, or `get_config()` when no `:ARG` is given; the config is then
locked, so an override naming a key it lacks is an error. Overrides apply in
command-line order; each value is read by the type of the key's current value
(`parse_override`), the same rules as tools/bench.py's --set. Every other flag, and
errors about flags nobody defined, stay absl's.
"""

from __future__ import annotations

import ast
import difflib
import importlib.machinery
import importlib.util
import os
import sys
import traceback
import weakref

from absl import flags
import ml_collections

from jaxlm import console
from jaxlm.config import set_key
from jaxlm.errors import ConfigError, one_line


flags.disclaim_key_flags()  # the --config flags belong to the module that defines them

_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")  # absl's spellings, any case
_BARE = ("bool", "literal")  # kinds given as a bare --config.KEY (True) or --noconfig.KEY


class ConfigFlag:
  """A `--NAME FILE[:ARG]` flag; after `parse_config_flags`, `value` is the loaded, locked
  and overridden config (None when the flag was not given), `spec` the FILE[:ARG] as
  given, and `overrides` the override values as parsed, {dotted key: value} in the order
  keys first appeared (a sweep passes them on to each trial)."""

  def __init__(self, name: str, flag_values, lock_config: bool):
    self.name, self.lock_config = name, lock_config
    self.value, self.spec, self.overrides = None, None, {}
    self._flag_values = weakref.ref(flag_values)  # FlagValues made and dropped by tests

  def defined_in(self, flag_values) -> bool:
    """Whether this flag was defined in `flag_values` (None: in one that is gone)."""
    return self._flag_values() is flag_values


_DEFINED: list[ConfigFlag] = []


def define_config_file(name: str, help_string: str, flag_values=None,
                       lock_config: bool = True) -> ConfigFlag:
  """`--NAME FILE[:ARG]` and its `--NAME.KEY=VALUE` overrides, read by
  `parse_config_flags`. absl knows --NAME as a string flag (for --help and
  `flags.mark_flags_as_required`); the config itself is the returned holder's `value`."""
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string(name, None, help_string, flag_values=fv)
  holder = ConfigFlag(name, fv, lock_config)
  _DEFINED[:] = [h for h in _DEFINED if not h.defined_in(None)]
  _DEFINED.append(holder)
  return holder


def parse_config_flags(argv: list[str], flag_values=None) -> list[str]:
  """Parse `argv` into `flag_values` (absl's FLAGS by default): each config flag defined
  there (`define_config_file`) is loaded and overridden here, every other argument goes
  to absl; absl's remaining arguments are returned. Every problem is a ConfigError of
  one line naming the flag, the key or the config file."""
  fv = flags.FLAGS if flag_values is None else flag_values
  try:
    argv = list(argv[:1]) + fv.read_flags_from_files(list(argv[1:]), force_gnu=False)
  except flags.Error as e:  # an unreadable --flagfile
    raise ConfigError(one_line(e)) from None
  for holder in [h for h in _DEFINED if h.defined_in(fv)]:
    argv = _read_config_flag(holder, argv, fv)
  try:
    return fv(argv)
  except flags.Error as e:  # a bad value, an unknown flag, a required one missing
    raise ConfigError(one_line(e)) from None
  except (TypeError, ValueError) as e:  # absl's "--noflag=x does not take an argument"
    raise ConfigError(one_line(f"{type(e).__name__}: {e}")) from None


def parse_flags(argv: list[str]) -> list[str]:
  """`parse_config_flags` for a command line: each problem is printed as one line,
  `config error: ...`, and the exit status is 2. Pass as
  `app.run(main, flags_parser=parse_flags)`."""
  try:
    return parse_config_flags(argv)
  except ConfigError as e:
    console.error(f"config error: {e}")
    sys.exit(2)


# ---------------------------------------------------------------------------------------
# The config file


def load_config_file(spec: str, name: str = "config", lock: bool = True):
  """FILE[:ARG] -> FILE's `get_config(ARG)` (`get_config()` without `:ARG`), locked;
  a ConfigError naming `--NAME=FILE[:ARG]` when the file is missing, fails to load, or
  `get_config` fails (with the exception's type, first line and line in FILE)."""
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    why = "is a directory, not a config file" if os.path.isdir(path) else "no such file"
    raise ConfigError(one_line(f"--{name}={spec}: {why}"))
  module_name = f"{name}_config"  # ml_collections' name for it
  loader = importlib.machinery.SourceFileLoader(module_name, path)  # any file suffix
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_file_location(module_name, path, loader=loader))
  sys.modules[module_name] = module  # as import does: dataclasses and pickle look here
  try:
    config = _exec(loader, module, [arg] if colon else [])
  except ConfigError as e:
    raise ConfigError(one_line(f"--{name}={spec}: {e}")) from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(one_line(f"--{name}={spec}: {_failure(e, path)}")) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(one_line(f"--{name}={spec}: get_config returned "
                               f"{type(config).__name__}, not an ml_collections.ConfigDict"))
  if lock:
    config.lock()
  return config


def _exec(loader, module, args):
  """Run the config module and its get_config(*args); the module leaves sys.modules if
  either fails, as import leaves it."""
  try:
    loader.exec_module(module)
    return module.get_config(*args)
  except BaseException:
    sys.modules.pop(module.__name__, None)
    raise


def _failure(e: Exception, path: str) -> str:
  """An exception from loading `path` as one line: its type, its message's first line
  and the line of `path` it came from."""
  where = e.lineno if isinstance(e, SyntaxError) else None
  for frame, lineno in traceback.walk_tb(e.__traceback__):
    if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
      where = lineno
  text = e.msg if isinstance(e, SyntaxError) else str(e)
  text = text.strip().splitlines()[0] if text.strip() else ""
  return f"{type(e).__name__}: {text}" + (f" (line {where})" if where else "")


# ---------------------------------------------------------------------------------------
# Overrides


def apply_override(config, key: str, text: str | None, flag: str | None = None):
  """Set dotted `key` of `config` from command-line `text` (`parse_override`'s rules)
  through `jaxlm.config.set_key`; the value set. `flag` is how the command line spelled
  the key, for messages (default `--config.KEY`)."""
  value = parse_override(config, key, text, flag)
  set_key(config, key, value)
  return value


def parse_override(config, key: str, text: str | None, flag: str | None = None):
  """The value command-line `text` gives dotted `key` of `config`, read by the type of the
  key's current value (ml_collections' config_flags rules):

  - str: the text as it is;
  - bool: true/t/1 or false/f/0, any case; None (a bare `--config.KEY`) is True;
  - int: Python's int(), with 0x (hex) and 0o (octal) prefixes; float: Python's float();
  - tuple, list: ast.literal_eval; a single value becomes a 1-tuple, and text that is no
    literal (a path, a glob) a 1-tuple of the text;
  - a section: a dict literal, which replaces the whole section;
  - None (or a type without a parser): ast.literal_eval, else the text as a string;
    true/false mean True/False.

  A ConfigError names `flag` (default `--config.KEY`) when the config has no such key or
  the text can't be read as the type."""
  flag = flag or f"--config.{key}"
  return _parse_text(_kind(config, key, flag), text, flag)


def _kind(config, key: str, flag: str) -> str:
  """How `key`'s text is read: bool, int, float, str, tuple, list, section or literal."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      above = ".".join(parts[:i])
      raise ConfigError(one_line(f"{flag}: the config has no key {key!r} ({above} is a "
                                 f"value, not a section)"))
    if part not in node:
      close = difflib.get_close_matches(part, [str(k) for k in node.keys()], 1, 0.75)
      raise ConfigError(one_line(f"{flag}: the config has no key {part!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else "")))
    if i == len(parts) - 1:
      kind = node.get_type(part)  # a placeholder's type, though its value is None
    node = node[part]
  if isinstance(kind, type) and issubclass(kind, ml_collections.ConfigDict):
    return "section"
  return {bool: "bool", int: "int", float: "float", str: "str", tuple: "tuple",
          list: "list"}.get(kind, "literal")


def parse_bool(text: str, what: str) -> bool:
  """absl's spellings of a boolean, any case; ConfigError naming `what` for anything else
  ("yes" too: one reading of true and false everywhere)."""
  if text.lower() in _TRUE + _FALSE:
    return text.lower() in _TRUE
  raise ConfigError(one_line(f"{what}={text}: must be true or false (t, f, 1, 0 also do)"))


def _parse_text(kind: str, text: str | None, flag: str):
  def bad(reason):
    return ConfigError(one_line(f"flag {flag}={text}: {reason}"))

  if text is None:  # the flag alone, the last argument
    if kind in _BARE:
      return True
    raise ConfigError(one_line(f"Missing value for flag {flag}"))
  if kind == "str":
    return text
  if kind == "bool":
    return parse_bool(text, f"flag {flag}")
  if kind in ("int", "float"):
    base = {"0o": 8, "0x": 16}.get(text[:2], 10) if len(text) > 2 else 10
    try:
      return int(text, base) if kind == "int" else float(text)
    except (ValueError, OverflowError) as e:
      raise bad(e) from None
  if kind in ("tuple", "list"):
    value = _tuple(text, bad)
    return list(value) if kind == "list" else value
  if kind == "section":
    try:
      value = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
      raise bad(f"a section takes a dict, e.g. \"{{'lr': 1e-3}}\" ({type(e).__name__})") from None
    if not isinstance(value, dict):
      raise bad(f"a section takes a dict, e.g. \"{{'lr': 1e-3}}\", not {type(value).__name__}")
    return ml_collections.ConfigDict(value)
  try:  # literal
    return ast.literal_eval(text.capitalize() if text in ("true", "false") else text)
  except (SyntaxError, ValueError):
    return text
  except (TypeError, MemoryError, RecursionError) as e:  # {[1]: 2}: an unhashable key
    raise bad(e) from None


def _tuple(text: str, bad) -> tuple:
  """ml_collections' TupleParser: a literal, else (for one word, a path, a glob) the text."""
  try:
    value = ast.literal_eval(text)
  except ValueError:  # a bare word: `--config.KEY=abc`
    value = text
  except SyntaxError:
    if "," in text or " " in text:  # meant as several elements
      raise bad(f"not a tuple literal; quote each element, e.g. \"('a', 'b')\", or the "
                f"whole text for one element ({repr(repr(text))})") from None
    value = text  # one element with an operator in it: '/path/to/file', 'data/*.txt'
  except (TypeError, MemoryError, RecursionError) as e:
    raise bad(e) from None
  if isinstance(value, tuple):
    return value
  if isinstance(value, (list, set, frozenset, dict)):
    return tuple(value)
  return (value,)


# ---------------------------------------------------------------------------------------
# The command line


def _read_config_flag(holder: ConfigFlag, argv: list[str], fv) -> list[str]:
  """Load `holder`'s config and apply its overrides; `argv` without the overrides (its
  --NAME stays, for absl's string flag)."""
  name = holder.name
  holder.value, holder.spec, holder.overrides = None, None, {}
  spec, _, _ = _scan(argv, name, fv, lambda key: None)
  if spec is None:  # overrides without a config: absl calls them unknown flags
    return argv
  config = load_config_file(spec, name, holder.lock_config)

  def takes_value(key):
    try:
      return _kind(config, key, "") not in _BARE
    except ConfigError:
      return None  # an unknown key: reported below, whatever follows it

  _, overrides, rest = _scan(argv, name, fv, takes_value)
  kinds = [_kind(config, key, shown) for shown, key, _, _ in overrides]  # unknown keys first
  order = list(dict.fromkeys(key for _, key, _, _ in reversed(overrides)))[::-1]
  for i, earlier in enumerate(order):  # each key at its last appearance
    for later in order[i + 1:]:
      if earlier.startswith(later + "."):
        raise ConfigError(f"--{name}.{later} after --{name}.{earlier}: the whole section "
                          f"would undo the override of its key; give the section first")
  values = {}
  for (shown, key, text, negated), kind in zip(overrides, kinds):
    if negated:
      if text is not None:
        raise ConfigError(one_line(f"{shown}={text}: the --no form takes no value"))
      if kind not in _BARE:
        raise ConfigError(f"{shown}: only a True/False key has the --no form (give "
                          f"--{name}.{key}=VALUE)")
      text = "false"
    value = _parse_text(kind, text, shown)
    if kind == "tuple" and key in values:  # repeated, as ml_collections: the elements add up
      value = tuple(values[key]) + value
    set_key(config, key, value)
    values[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  holder.value, holder.spec, holder.overrides = config, spec, values
  return rest


def _scan(argv, name, fv, takes_value):
  """(FILE[:ARG] of the last --NAME, the overrides as (flag as typed, key, text or None,
  negated) in order, the other arguments), read the way absl reads a command line:
  `--NAME.KEY VALUE` takes the next argument unless `takes_value(KEY)` is False (a bool;
  None: it does when that doesn't start with -), other known flags keep their values,
  nothing after `--` is a flag."""
  spec, overrides, rest = None, [], list(argv[:1])
  i = 1
  while i < len(argv):
    arg = argv[i]
    i += 1
    if arg == "--":
      rest += argv[i - 1:]
      break
    dashes = 2 if arg.startswith("--") else 1 if arg.startswith("-") else 0
    flag, eq, value = arg[dashes:].partition("=")
    if not dashes or not flag:  # a positional argument
      rest.append(arg)
      if not fv.is_gnu_getopt():
        rest += argv[i:]
        break
      continue
    negated = flag.startswith(f"no{name}.")
    if flag == name:
      rest.append(arg)
      if not eq:
        if i == len(argv):  # absl says the value is missing
          continue
        value = argv[i]
        rest.append(value)
        i += 1
      spec = value
    elif flag.startswith(f"{name}.") or negated:
      key, text = flag.split(".", 1)[1], value if eq else None
      if not eq and not negated and i < len(argv):
        wants = takes_value(key)
        if wants or (wants is None and not argv[i].startswith("-")):
          text = argv[i]
          i += 1
      overrides.append((arg[:dashes] + flag, key, text, negated))
    else:
      rest.append(arg)
      valued = flag == "undefok" or (flag in fv and not fv[flag].boolean)
      if valued and not eq and i < len(argv):  # --workdir DIR: DIR is no flag of ours
        rest.append(argv[i])
        i += 1
  return spec, overrides, rest
