"""The package's shape, checked from its source (`ast`, nothing imported): imports point
only down the layers (README "Layout"), no import cycle counting imports inside
functions, an import inside a function only for a dependency that must stay lazy (with
its reason beside it), and no function over 80 lines without a `# long:` reason."""

import ast
import os

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "jaxlm")

# Bottom to top: a module may import its own layer's modules (without a cycle) and the
# layers below, never one above. `data` is every module of jaxlm/data, `tasks` every
# module of jaxlm/tasks (the package itself included).
LAYERS = (
    ("errors",),
    ("fileio", "console"),
    ("config", "cli"),
    ("sharding", "attention", "model", "lora", "losses", "optimizer", "metrics", "data"),
    ("checkpoint", "hf", "hf_tokenizer"),
    ("workdir", "generate", "sample", "reward_model"),
    ("runs",),
    ("reward_fns",),
    ("loop",),
    ("tasks",),
    ("evaluate", "estimate", "plots", "report", "selfdata", "tpu", "harness"),
    ("validate",),
    ("pipeline", "sweep", "bench"),
    ("launch",),
)
# Imported inside a function only: optional or heavy dependencies a plain run never loads,
# and the kernels of one accelerator (cuDNN's, TPU Pallas).
LAZY = ("torch", "transformers", "tensorflow_datasets", "tensorflow", "matplotlib", "wandb",
        "lm_eval", "jinja2", "tokenizers", "pyarrow", "tensorboardX", "jax._src.cudnn",
        "jax.experimental.pallas")
# jaxlm modules whose top imports an optional dependency (lm_eval): imported lazily too.
LAZY_MODULES = ("jaxlm.harness",)
MAX_LINES = 80


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _layer(module: str) -> int:
  short = module.split(".")[1] if "." in module else ""
  for i, names in enumerate(LAYERS):
    if short in names:
      return i
  raise AssertionError(f"{module}: not in any layer of LAYERS (tests/unit/test_structure.py)")


def _imports(module: str):
  """(line, target jaxlm module or None, the imported module, inside a function, line text)."""
  path = MODULES[module]
  with open(path, encoding="utf-8") as f:
    source = f.read()
  lines = source.splitlines()
  tree = ast.parse(source)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        for alias in child.names:
          yield child.lineno, _resolve(alias.name), alias.name, in_function, \
              lines[child.lineno - 1]
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")[:len(package.split(".")) - child.level + 1]
          base = ".".join(parts + ([child.module] if child.module else []))
        for alias in child.names:
          target = _resolve(f"{base}.{alias.name}") or _resolve(base)
          yield child.lineno, target, base, in_function, lines[child.lineno - 1]
      yield from visit(child, inner)

  yield from visit(tree, False)


def _resolve(name: str) -> str | None:
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def test_every_module_has_a_layer():
  for module in MODULES:
    if module != "jaxlm":
      _layer(module)


def test_imports_point_down_the_layers():
  upward = []
  for module in MODULES:
    if module == "jaxlm":
      continue
    for line, target, _, _, _ in _imports(module):
      if target and target not in ("jaxlm", module) and _layer(target) > _layer(module):
        upward.append(f"{module}:{line} imports {target} (layer {_layer(target)} > "
                      f"{_layer(module)})")
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  edges = {m: {t for _, t, _, _, _ in _imports(m) if t and t not in ("jaxlm", m)}
           for m in MODULES}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def connect(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in edges:
    if v not in index:
      connect(v)
  assert not cycles, cycles


def test_imports_inside_functions_are_lazy_dependencies_with_a_reason():
  bad = []
  for module in MODULES:
    for line, target, imported, in_function, text in _imports(module):
      if not in_function:
        continue
      lazy = any(imported == name or imported.startswith(name + ".") for name in LAZY)
      if target in LAZY_MODULES:
        lazy, target = True, None
      if target or not lazy:
        bad.append(f"{module}:{line}: {text.strip()} (import it at the top of the module)")
      elif "# lazy:" not in text:
        bad.append(f"{module}:{line}: {text.strip()} (say why it is lazy: `# lazy: reason`)")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short_or_say_why(module):
  path = MODULES[module]
  with open(path, encoding="utf-8") as f:
    source = f.read()
  lines = source.splitlines()
  long = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = node.end_lineno - node.lineno + 1
      first = min([node.lineno] + [d.lineno for d in node.decorator_list])
      said = "# long:" in lines[first - 2] if first >= 2 else False
      if length > MAX_LINES and not said:
        long.append(f"{module}:{node.lineno} {node.name}() is {length} lines")
  assert not long, "\n".join(long) + f" (over {MAX_LINES}: split it, or write `# long: why` " \
                                    f"on the line above)"


def _print_to_a_console(node: ast.Call) -> bool:
  """print() with no file=, or file=sys.stdout / sys.stderr: a line for the user that
  bypasses the one logger (jaxlm.console). A stream the caller hands in stays allowed."""
  if not (isinstance(node.func, ast.Name) and node.func.id == "print"):
    return False
  file = next((k.value for k in node.keywords if k.arg == "file"), None)
  return file is None or (isinstance(file, ast.Attribute) and isinstance(file.value, ast.Name)
                          and file.value.id == "sys" and file.attr in ("stdout", "stderr"))


def test_the_library_speaks_through_its_one_logger():
  """jaxlm's lines go through jaxlm.console (info, warning, error), so an open progress
  bar is redrawn around them; a module's own logger would bypass the facade as well."""
  found = []
  for module, path in MODULES.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and _print_to_a_console(node):
        found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: print()")
      elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "getLogger" and module != "jaxlm.console"):
        found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: getLogger()")
  assert not found, "use jaxlm.console instead:\n" + "\n".join(found)
