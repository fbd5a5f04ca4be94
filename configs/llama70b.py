"""The paper's 70B headline: Llama-3-70B (same as llama3_70b.py)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "llama3_70b", os.path.join(os.path.dirname(__file__), "llama3_70b.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def get_config():
  c = _module.get_config()
  c.run_dir = "runs/llama70b"
  return c
