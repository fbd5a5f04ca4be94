"""The device check's `--tiny` mode end to end, as a user runs it: the accelerator run is the same
code at larger shapes, so this keeps it from rotting on machines without one. Its verdicts are
checked against the numbers it wrote (not only its exit status), with the tolerances its docstring
states: a parity or pick failure fails this test."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("llama", "mistral", "qwen2", "mixtral")
MASKS = ("dense", "random", "no_attention")


def test_tiny_device_check_passes_and_reports(tmp_path):
  out = tmp_path / "device_check.json"
  # A plain CPU process: not the 8 simulated devices conftest gives this one.
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--tiny", "--out",
                         str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  summary = [line for line in proc.stdout.splitlines() if line.startswith("device_check:")]
  assert len(summary) == 1, proc.stdout[-2000:]
  result = json.loads(out.read_text())
  assert result["summary"] == summary[0]
  assert result["status"] == "pass" and summary[0].startswith("device_check: PASS")
  assert result["errors"] == [] and result["skipped"] == []

  # The environment is read, not assumed.
  env_report = result["environment"]
  assert env_report["jax_backend"] == "cpu" and env_report["device_kind"]
  assert env_report["versions"]["jax"] and env_report["versions"]["torch"]
  assert env_report["device_memory"] is None  # the CPU keeps no device-memory statistics

  # Logits parity: every family, both dtypes, every mask, within the stated tolerances.
  rows = result["parity"]["logits"]
  assert sorted((r["family"], r["dtype"], r["mask"]) for r in rows) == sorted(
      (f, d, m) for f in FAMILIES for d in ("float32", "bfloat16") for m in MASKS)
  for r in rows:
    what = f"{r['family']} {r['dtype']} {r['mask']}"
    if r["dtype"] == "float32":
      assert r["reference_max_abs"] > 1.0, what  # a 1e-4 tolerance on O(1) logits means something
      assert r["max_abs_err"] <= 1e-4, what
    else:
      assert r["rms_err"] <= 2.0 * r["torch_bf16_rms_err"] + 1e-3, what
    assert r["pass"], what

  # The greedy search picks what the plain reference loop picks, with the same scores.
  greedy = result["parity"]["greedy"]
  assert greedy["steps"] == 4 and greedy["scorer_picks"] == greedy["reference_picks"]
  assert greedy["max_rel_score_diff"] <= 1e-4

  # The scorer against the official loop: the same 3 picks, a ratio measured in this run.
  comparison = result["comparison"]
  assert comparison["steps_compared"] == 3
  assert comparison["picks_scorer"] == comparison["picks_official"]
  assert comparison["ratio"] > 0
  scorer = result["jax"]["scorer"]
  assert len(scorer["steps"]) == 3 and scorer["fraction_of_bf16_matmul_rate"] > 0
  assert result["jax"]["matmul"]["flops_per_second"] > 0

  # Throughput of the dense and the 25%-pruned model (3 of 12 sublayers).
  tput = result["jax"]["throughput"]
  assert sum(tput["pruned"]["removed"].values()) == 3
  for name in ("dense", "pruned"):
    assert tput[name]["prefill_tokens_per_s"] > 0 and tput[name]["decode_tokens_per_s"] > 0
  assert tput["pruned"]["params"] < tput["dense"]["params"]
