"""Tiny random models, checkpoint files and inputs that the tests and the benchmarks both build.

  inputs.py       speech-like test audio, a random prompt of CSM rows, the Llama-3 tokenizer file the tests use
  tiny_csm.py     a tiny random CSM in transformers' and Sesame's file layouts (built with transformers)
  random_mimi.py  a random Mimi in Kyutai's and transformers' file layouts (built with moshi)
  stub_device.py  the engine's device programs on the host, costing seconds of a fake clock (no accelerator)

The checkpoint builders run the PyTorch references (torch, transformers, moshi), which only the test extra
installs: they import them when called and say what to install when one is missing.
"""

from __future__ import annotations

import importlib


def reference(module: str):
    """Imports `module` of a PyTorch reference (torch, transformers, moshi), or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"csm_jax.testing builds its checkpoints with the PyTorch references and needs {module} "
                          f"({e}): pip install -e '.[test]', then moshi==0.2.2 with --no-deps") from e
