"""Print what a jaxlm checkpoint holds, without loading it.

  python tools/inspect_checkpoint.py runs/tiny              # latest step of a workdir
  python tools/inspect_checkpoint.py runs/tiny/checkpoints/200
"""

import argparse
import logging
import sys

from jaxlm import checkpoint


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path", help="a workdir, its checkpoints/ folder, or one step folder")
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    info = checkpoint.describe(args.path)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{info['directory']}: steps {', '.join(map(str, info['steps']))}")
  print(f"step {info['step']}: {info['num_params']:,} parameters")
  width = max(len(name) for name, _, _ in info["params"])
  for name, shape, dtype in info["params"]:
    print(f"  {name:<{width}}  {dtype:<8} {'x'.join(map(str, shape))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
