"""FinerCut on Meta-Llama-3-70B with the paper's settings (finercut_jax.jobs.settings.paper_config).

Expects a local Hugging Face checkpoint directory (config.json + safetensors); point
--config.model.path at it. WikiText-2 must be available to `datasets` locally, or set
--config.data.source to a local .txt/.jsonl/.parquet file.

Mesh: an 8-way model axis (scorer.mesh_model=8: the weights split over 8 devices, 17.5 GB each in
bfloat16) and a candidate axis over the rest, so it needs a multiple of 8 devices (8x H100/H200,
a v4-32 slice) and stops at once on any other count. On TPU slices, the meshes that fit (compiled
for the slice by benchmarks/aot_memory.py --topology, README table): v5p-32 with
--config.scorer.mesh_model=4 --config.scorer.state_memory_gb=39; v4-32 as is with
--config.scorer.state_memory_gb=0; v5e-64 with --config.scorer.mesh_model=32
--config.scorer.state_memory_gb=0. Several hosts run it as one program: launch/tpu_pod.sh (TPU VM
slice) or launch/slurm_gpu.sbatch (SLURM GPU cluster).
"""
from finercut_jax.jobs.settings import paper_config


def get_config():
  return paper_config("llama3_70b", "Meta-Llama-3-70B", model_axis=8)
