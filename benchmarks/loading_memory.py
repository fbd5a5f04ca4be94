"""Host memory of loading a sharded Hugging Face checkpoint when the job runs as N processes.

  python -m benchmarks.loading_memory --processes=1,2,4 --out=benchmarks/results/loading_memory_cpu.json

Writes a random Llama checkpoint (safetensors, split over several files with
`model.safetensors.index.json`; or reuses `--checkpoint DIR`), then for each N starts N processes
on this machine (JAX multi-process over localhost, one CPU device each, the mesh's model axis
spanning all N). Each process loads the checkpoint with `loading.load_params` and the job's
parameter shardings, so it should read only the slices its own device holds, and reports:

- its resident memory after `import jax`, distributed start, mesh, a warm-up load of a tiny
  checkpoint of the same structure (lazy imports and set-up) and a barrier (the baseline);
- the peak during `load_params` + `block_until_ready`, above that baseline: VmRSS (total), RssAnon
  (heap: the arrays) and RssFile (file pages mapped into the process: safetensors reads through
  mmap; they are page cache, shared and reclaimable, but they count in RSS and in the memory limit
  of a container until unmapped). Sampled every `--interval_ms` by a separate sampler process
  (not a thread: the loading code holds the GIL for long stretches), plus the kernel's own
  high-water mark VmHWM (reset through /proc/self/clear_refs), which catches spikes between
  samples for the total;
- the bytes of its own addressable shards (what it must hold in the end), and the anonymous memory
  held once loading returned (after jaxlib released its last host array; and after
  `malloc_trim`).

The page cache of the checkpoint's files is dropped before each N (`--cache=cold`, the default;
`fsync` + `posix_fadvise(DONTNEED)`, no root needed) so every N starts from disk; `--cache=warm` leaves
it. Process 0 of the largest N also gathers whole weights across processes
(`process_allgather`) and compares them bit for bit with the file's tensors.

`--impl DIR` loads `finercut_jax` from DIR instead of this checkout (to measure a modified
finercut_jax/model/loading.py without touching the repository). Internal: `--worker SPEC_JSON`
is one process.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 2 ** 20
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

# ----------------------------------------------------------------------------- /proc


def read_status(pid="self") -> dict:
  """Memory fields of /proc/<pid>/status, in bytes."""
  out = {}
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      key, _, rest = line.partition(":")
      if key in STATUS_FIELDS:
        out[key] = int(rest.split()[0]) * 1024
  return out


# The sampler: a separate process reading the worker's /proc status every INTERVAL seconds until
# a line arrives on stdin, then printing the peaks (bytes) as JSON.
_SAMPLER = r"""
import json, os, select, sys, time
pid, interval = sys.argv[1], float(sys.argv[2])
fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
keys = ("VmRSS", "RssAnon", "RssFile")
peak = dict.fromkeys(keys, 0)
at = dict.fromkeys(keys, 0.0)
both = {}
n = 0
t0 = time.monotonic()
sys.stdout.write("ready\n"); sys.stdout.flush()
while True:
  ready = select.select([sys.stdin], [], [], interval)[0]
  vals = {}
  for line in os.pread(fd, 8192, 0).decode().splitlines():
    k, _, rest = line.partition(":")
    if k in keys:
      vals[k] = int(rest.split()[0]) * 1024
  n += 1
  for k in keys:
    if vals[k] > peak[k]:
      peak[k], at[k] = vals[k], time.monotonic() - t0
      if k == "VmRSS":
        both = dict(vals)
  if ready:
    break
print(json.dumps({"peak": peak, "peak_at_s": at, "at_total_peak": both, "samples": n,
                  "seconds": time.monotonic() - t0}))
"""


class Sampler:
  def __init__(self, interval_s: float):
    self.proc = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid()),
                                  str(interval_s)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    assert self.proc.stdout.readline().strip() == "ready"

  def stop(self) -> dict:
    out, _ = self.proc.communicate("stop\n", timeout=60)
    return json.loads(out)


def reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


# ----------------------------------------------------------------------------- the checkpoint

_LAYER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def hf_shapes(a) -> dict:
  """Hugging Face tensor name -> shape ([out, in] for projections), in file order."""
  D, F, V, hd = a.hidden, a.intermediate, a.vocab, a.hidden // a.heads
  q, kv = a.heads * hd, a.kv_heads * hd
  per_layer = {"input_layernorm.weight": (D,), "self_attn.q_proj.weight": (q, D),
               "self_attn.k_proj.weight": (kv, D), "self_attn.v_proj.weight": (kv, D),
               "self_attn.o_proj.weight": (D, q), "post_attention_layernorm.weight": (D,),
               "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
               "mlp.down_proj.weight": (D, F)}
  shapes = {"model.embed_tokens.weight": (V, D)}
  for l in range(a.layers):
    for name in _LAYER:
      shapes[f"model.layers.{l}.{name}"] = per_layer[name]
  shapes["model.norm.weight"] = (D,)
  shapes["lm_head.weight"] = (V, D)
  return shapes


def write_checkpoint(directory: str, a) -> None:
  dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[a.file_dtype]
  os.makedirs(directory, exist_ok=True)
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "hidden_size": a.hidden, "intermediate_size": a.intermediate,
      "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
      "num_key_value_heads": a.kv_heads, "head_dim": a.hidden // a.heads,
      "vocab_size": a.vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
      "max_position_embeddings": 4096, "tie_word_embeddings": False,
      "attention_bias": False, "mlp_bias": False, "torch_dtype": a.file_dtype,
  }
  shapes = hf_shapes(a)
  itemsize = np.dtype(dtype).itemsize
  total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
  per_file = total / a.files
  groups, size = [[]], 0
  for name, shape in shapes.items():  # consecutive tensors, about total / files bytes per file
    nbytes = int(np.prod(shape)) * itemsize
    if groups[-1] and size + nbytes / 2 > per_file * len(groups) and len(groups) < a.files:
      groups.append([])
    groups[-1].append(name)
    size += nbytes
  rng = np.random.default_rng(a.seed)
  weight_map = {}
  for i, names in enumerate(groups):
    fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    tensors = {}
    for name in names:
      shape = shapes[name]
      w = rng.standard_normal(shape, dtype=np.float32)
      w = 1.0 + 0.1 * w if len(shape) == 1 else 0.02 * w
      tensors[name] = w.astype(dtype)
      weight_map[name] = fname
    save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
    del tensors
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=1)


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def git_state(directory: str) -> dict:
  """The commit of `directory`'s checkout and whether its finercut_jax/model/loading.py differs
  from it."""
  def git(*args):
    try:
      return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None
  return {"head": git("rev-parse", "HEAD"),
          "loading_py_modified": bool(git("status", "--porcelain", "finercut_jax/model/loading.py"))}


def checkpoint_files(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.endswith(".safetensors"))


def checkpoint_bytes(directory: str) -> int:
  return sum(os.path.getsize(p) for p in checkpoint_files(directory))


def drop_page_cache(directory: str) -> None:
  for path in checkpoint_files(directory):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)  # dirty pages (a checkpoint just written) are not dropped
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def cached_bytes(directory: str) -> int | None:
  """Bytes of the checkpoint in the page cache (util-linux `fincore`), None if unavailable."""
  if not shutil.which("fincore"):
    return None
  try:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          *checkpoint_files(directory)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return sum(int(x) for x in out.split())
  except (subprocess.SubprocessError, ValueError):
    return None


def file_tensor(directory: str, name: str):
  """One tensor straight from the files (own header parse + np.memmap), for the exact check.

  Returns an array of the file's dtype and shape (HF [out, in] for projections).
  """
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    fname = json.load(f)["weight_map"][name]
  path = os.path.join(directory, fname)
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    meta = json.loads(f.read(n))[name]
  dtype = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[meta["dtype"]]
  start, end = meta["data_offsets"]
  return np.array(np.memmap(path, dtype, "r", 8 + n + start, tuple(meta["shape"])))


# ----------------------------------------------------------------------------- one process

# Parameters stored transposed in the file (HF [out, in], ours [..., in, out]): a sharding on any
# of our dimensions but the last reads a block of the file's columns, i.e. a strided slice.
_TRANSPOSED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")


def worker(spec: dict) -> dict:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_NUM_CPU_DEVICES"] = "1"
  sys.path.insert(0, spec["impl"])
  # lazy: JAX reads the environment above when imported, and finercut_jax comes from --impl
  import jax
  import jax.numpy as jnp
  import safetensors  # noqa: F401  (its library mapped before the baseline)

  from finercut_jax.model import loading
  from finercut_jax.parallel import distributed, sharding

  n, i = spec["num_processes"], spec["process_id"]
  if n > 1:
    distributed.initialize(distributed.Settings(f"localhost:{spec['port']}", n, i))
  assert jax.process_count() == n and jax.device_count() == n, (jax.process_count(),
                                                                jax.device_count())
  path = spec["checkpoint"]
  dtype = jnp.dtype(spec["dtype"])
  cfg = loading.load_config(path)
  mesh = sharding.make_mesh(cand=1, model=n)
  fn = sharding.param_sharding_fn(mesh, cfg)
  # A warm-up load of a tiny checkpoint of the same structure: whatever loading imports or
  # initialises lazily (modules, libraries, allocator arenas) is then in the baseline.
  _, tiny = loading.load_params(spec["warmup_checkpoint"], dtype,
                                sharding.param_sharding_fn(mesh, loading.load_config(
                                    spec["warmup_checkpoint"])))
  jax.block_until_ready(tiny)
  del tiny
  distributed.barrier("before-load")  # also compiles and runs the barrier's program first

  base = read_status()
  hwm_reset = reset_hwm()
  sampler = Sampler(spec["interval_s"])
  t0 = time.monotonic()
  _, params = loading.load_params(path, dtype, fn)
  jax.block_until_ready(params)
  seconds = time.monotonic() - t0
  sampled = sampler.stop()
  end = read_status()
  hwm = end["VmHWM"] if hwm_reset else None

  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  specs, sizes, columns, own, total = {}, {}, [], 0, 0
  for p, x in leaves:
    key = jax.tree_util.keystr(p)
    specs[key] = str(x.sharding.spec)
    sizes[key] = x.nbytes
    dims = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    if p[-1].key in _TRANSPOSED and any(d is not None for d in dims[x.ndim - 2:-1]):
      columns.append(key)
    own += sum(s.data.nbytes for s in x.addressable_shards)
    total += x.nbytes
  result = {
      "process_id": i, "num_processes": n, "pid": os.getpid(),
      "loading_py": loading.__file__, "loading_py_sha256": file_sha256(loading.__file__),
      "seconds": seconds,
      "baseline": base, "end": end, "vm_hwm": hwm, "vm_hwm_reset": hwm_reset,
      "sampled": sampled,
      "peak_total_above_baseline": max(sampled["peak"]["VmRSS"], hwm or 0) - base["VmRSS"],
      "peak_anon_above_baseline": sampled["peak"]["RssAnon"] - base["RssAnon"],
      "peak_file_above_baseline": sampled["peak"]["RssFile"] - base["RssFile"],
      "end_anon_above_baseline": end["RssAnon"] - base["RssAnon"],
      "end_file_above_baseline": end["RssFile"] - base["RssFile"],
      "own_shard_bytes": own, "global_param_bytes": total, "shardings": specs,
      "param_bytes": sizes, "column_block_params": columns,
  }

  # jaxlib drops its reference to the host array of the last device_put lazily, at its next call
  # (measured: the last parameter's host copy stays until then), so the memory held for good is
  # read after one more tiny transfer; then after returning the allocator's free pages.
  jax.device_put(np.zeros(1, np.float32), jax.local_devices()[0]).block_until_ready()
  gc.collect()
  result["held_anon_above_baseline"] = read_status()["RssAnon"] - base["RssAnon"]
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    result["held_anon_after_trim_above_baseline"] = read_status()["RssAnon"] - base["RssAnon"]
  except OSError:
    result["held_anon_after_trim_above_baseline"] = None

  if spec["verify"]:
    from jax.experimental import multihost_utils  # lazy: JAX, as above
    checks = {}
    for ours, hf, transpose in (("wo", "self_attn.o_proj.weight", True),
                                ("w_down", "mlp.down_proj.weight", True),
                                ("wk", "self_attn.k_proj.weight", True)):
      x = params["layers"][ours]
      got = np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if i == 0:
        ok = got.shape == x.shape
        for l in range(x.shape[0]):
          want = file_tensor(path, f"model.layers.{l}.{hf}")
          want = (want.T if transpose else want).astype(got.dtype)
          ok = ok and np.array_equal(got[l], want)
        checks[ours] = {"spec": str(x.sharding.spec), "shape": list(x.shape), "exact": bool(ok)}
      del got
    for ours, hf, transpose in (("lm_head", "lm_head.weight", True),
                                ("embed", "model.embed_tokens.weight", False)):
      x = params[ours]
      got = np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if i == 0:
        want = file_tensor(path, hf)
        want = (want.T if transpose else want).astype(got.dtype)
        checks[ours] = {"spec": str(x.sharding.spec), "shape": list(x.shape),
                        "exact": bool(got.shape == want.shape and np.array_equal(got, want))}
      del got
    result["verify"] = checks
  distributed.barrier("done")
  return result


# ----------------------------------------------------------------------------- the driver


def run_n(a, n: int, verify: bool) -> list[dict]:
  # lazy: the workers run this file as a script, where the `benchmarks` package is not importable
  from benchmarks.processes import free_port, wait_all
  port = free_port()
  procs = []
  for i in range(n):
    spec = {"checkpoint": a.checkpoint, "num_processes": n, "process_id": i, "port": port,
            "dtype": a.dtype, "impl": a.impl, "verify": verify, "warmup_checkpoint": a.warmup,
            "interval_s": a.interval_ms / 1e3}
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                   json.dumps(spec)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=REPO))
  outputs, failed = wait_all(procs, a.timeout)
  results = []
  for i, (p, out) in enumerate(zip(procs, outputs)):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if p.returncode != 0 or not lines or failed:
      sys.stderr.write(f"--- process {i} of {n} (exit {p.returncode}):\n{out[-4000:]}\n")
      raise SystemExit(f"{n} processes: process {i} failed")
    results.append(json.loads(lines[-1][len("RESULT "):]))
  return results


def stat_of(vals) -> dict:
  return {"median": statistics.median(vals), "max": max(vals), "per_process": vals}


def summarize(n: int, results: list[dict], ckpt: int) -> dict:
  s = {"num_processes": n, "checkpoint_bytes": ckpt}
  for key in ("peak_total_above_baseline", "peak_anon_above_baseline",
              "peak_file_above_baseline", "end_anon_above_baseline", "end_file_above_baseline",
              "held_anon_above_baseline", "held_anon_after_trim_above_baseline",
              "own_shard_bytes", "seconds"):
    s[key] = stat_of([r[key] or 0 for r in results])
  s["baseline_rss"] = stat_of([r["baseline"]["VmRSS"] for r in results])
  own = statistics.median(s["own_shard_bytes"]["per_process"])
  for kind in ("total", "anon", "file"):
    s[f"peak_{kind}_over_checkpoint"] = {
        k: s[f"peak_{kind}_above_baseline"][k] / ckpt for k in ("median", "max")}
  s["peak_total_over_own"] = {k: s["peak_total_above_baseline"][k] / own
                              for k in ("median", "max")}
  # File pages a process maps if it touches only its own slices vs all of every column-block
  # tensor (see column_block_params): own share of the rest + whole column-block tensors.
  r0 = results[0]
  col = sum(r0["param_bytes"][k] for k in r0["column_block_params"])
  s["column_block_bytes"] = col
  s["file_pages_if_own_slices_only"] = r0["global_param_bytes"] / n
  s["file_pages_if_column_tensors_whole"] = (r0["global_param_bytes"] - col) / n + col
  s["samples"] = [r["sampled"]["samples"] for r in results]
  return s


def print_table(summaries: list[dict]) -> None:
  m = lambda b: f"{b / MIB:6.0f}"
  hdr = ("  N  ckpt  own        | peak above baseline: total  anon  file | total/ckpt anon/ckpt "
         "total/own | held  trimmed | load s")
  print("MiB per process; total = max(sampled VmRSS, VmHWM); held = anon after loading "
        "(trimmed: after malloc_trim)")
  print(hdr)
  print("-" * len(hdr))
  for s in summaries:
    for which in ("median", "max"):
      print(f"{s['num_processes']:3d} {m(s['checkpoint_bytes'])} {m(s['own_shard_bytes'][which])}"
            f" {which:>6} |                  {m(s['peak_total_above_baseline'][which])}"
            f"{m(s['peak_anon_above_baseline'][which])}{m(s['peak_file_above_baseline'][which])} "
            f"| {s['peak_total_over_checkpoint'][which]:10.2f} "
            f"{s['peak_anon_over_checkpoint'][which]:9.2f} "
            f"{s['peak_total_over_own'][which]:9.2f} |"
            f"{m(s['held_anon_above_baseline'][which])} "
            f"{m(s['held_anon_after_trim_above_baseline'][which])}  | "
            f"{s['seconds'][which]:6.1f}")
  s = summaries[-1]
  print(f"\ncolumn-block reads (HF [out, in] tensors sharded on `in`): "
        f"{s['column_block_bytes'] / MIB:.0f} MiB of the parameters. File pages a process would "
        f"map, by N: only its own slices / column-block tensors whole:")
  for s in summaries:
    print(f"  N={s['num_processes']}: {s['file_pages_if_own_slices_only'] / MIB:.0f} / "
          f"{s['file_pages_if_column_tensors_whole'] / MIB:.0f} MiB "
          f"(measured peak RssFile: median {s['peak_file_above_baseline']['median'] / MIB:.0f})")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", default="1,2,4")
  p.add_argument("--checkpoint", help="checkpoint directory: reused if it holds config.json, "
                 "else written there and kept (default: a temporary directory, removed)")
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--intermediate", type=int, default=8192)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--files", type=int, default=3, help="safetensors files of the checkpoint")
  p.add_argument("--file_dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--dtype", default="bfloat16", help="dtype the parameters are loaded as")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache", default="cold", choices=("cold", "warm"))
  p.add_argument("--interval_ms", type=float, default=5.0)
  p.add_argument("--impl", default=REPO, help="directory holding the finercut_jax to measure")
  p.add_argument("--timeout", type=float, default=600, help="seconds per N, all processes")
  p.add_argument("--no_verify", action="store_true")
  p.add_argument("--out")
  a = p.parse_args(argv)
  a.impl = os.path.abspath(a.impl)
  counts = [int(x) for x in a.processes.split(",")]

  tmp = None
  if a.checkpoint and os.path.isfile(os.path.join(a.checkpoint, "config.json")):
    print(f"reusing checkpoint {a.checkpoint}")
  else:
    if not a.checkpoint:
      tmp = a.checkpoint = tempfile.mkdtemp(prefix="loading_memory_ckpt_")
    t = time.monotonic()
    write_checkpoint(a.checkpoint, a)
    print(f"wrote checkpoint {a.checkpoint} in {time.monotonic() - t:.0f} s")
  a.checkpoint = os.path.abspath(a.checkpoint)
  with open(os.path.join(a.checkpoint, "config.json")) as f:
    hf_config = json.load(f)
  ckpt = checkpoint_bytes(a.checkpoint)
  print(f"checkpoint: {ckpt / MIB:.0f} MiB in {len(checkpoint_files(a.checkpoint))} files; "
        f"finercut_jax from {a.impl}; cache {a.cache}")

  summaries, raw = [], {}
  a.warmup = tempfile.mkdtemp(prefix="loading_memory_warmup_")
  tiny = argparse.Namespace(**dict(vars(a), hidden=8 * a.heads, intermediate=64 * a.heads,
                                   layers=1, vocab=64 * a.heads, files=2))
  write_checkpoint(a.warmup, tiny)
  try:
    for n in counts:
      before = None
      if a.cache == "cold":
        drop_page_cache(a.checkpoint)
      before = cached_bytes(a.checkpoint)
      verify = (n == max(counts)) and not a.no_verify
      t = time.monotonic()
      results = run_n(a, n, verify)
      s = summarize(n, results, ckpt)
      s["page_cache_bytes_at_start"] = before
      s["wall_seconds"] = time.monotonic() - t
      summaries.append(s)
      raw[str(n)] = results
      print(f"N={n}: {s['wall_seconds']:.0f} s wall, page cache at start "
            f"{'?' if before is None else f'{before / MIB:.0f} MiB'}")
      for r in results:
        if "verify" in r:
          for k, v in r["verify"].items():
            print(f"  verify {k} {v['shape']} {v['spec']}: "
                  f"{'exact' if v['exact'] else 'MISMATCH'}")
  finally:
    shutil.rmtree(a.warmup, ignore_errors=True)
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)

  print()
  print_table(summaries)
  r0 = raw[str(max(counts))][0]
  print("column-block parameters: " + ", ".join(r0["column_block_params"]))
  print("shardings at N=%d: %s" % (max(counts), ", ".join(
      f"{k}{v}" for k, v in r0["shardings"].items())))
  bad = [k for r in raw[str(max(counts))] for k, v in r.get("verify", {}).items()
         if not v["exact"]]
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump({"args": vars(a), "hf_config": hf_config, "checkpoint_bytes": ckpt,
                 "impl_git": git_state(a.impl),
                 "command": " ".join(["python -m benchmarks.loading_memory"] + sys.argv[1:]),
                 "summaries": summaries, "raw": raw}, f, indent=1)
    print(f"wrote {a.out}")
  if bad:
    raise SystemExit(f"loaded weights differ from the file: {bad}")


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "--worker":
    sys.stdout.flush()
    print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
  else:
    main()
