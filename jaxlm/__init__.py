"""jaxlm: JAX/Flax, TPU-first training of large language models."""

__version__ = "0.1.0"
