"""Import and export against transformers itself (needs torch + transformers; CI does not).

For each supported kind, transformers writes a random model (``save_pretrained``): Llama with an
untied head and ReLU, Llama 3 ``rope_type: llama3``, ``linear`` and ``yarn`` RoPE scaling, a
ProSparse-style FATReLU gate (``hidden_act: fatrelu`` + ``hidden_act_param``, run in transformers
by patching ``F.threshold`` into the MLP, as ProSparse's own modeling code does), and a Mistral
with a sliding window shorter than the sequence. Then:

1. ``sparse_jax.hf.load_hf`` imports it; logits on random tokens are compared with transformers'
   (float32 on both sides, highest matmul precision): max |diff| / max |logit| <= 1e-5.
2. ``sparse_jax.hf.export_hf`` writes it back; transformers loads the export
   (``AutoModelForCausalLM.from_pretrained``) and its logits are compared with the original's;
   ``AutoTokenizer`` must encode text as the byte tokenizer does, with no BOS.

Writes ``check_hf_transformers.json`` (device, command, versions, per-kind errors) under ``$OUT``
(if set) and ``experiments/results/``. Exit status 1 if any check fails.

    python experiments/check_hf_transformers.py            # ~1-2 minutes on the GPU machine
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import sys
import tempfile
import time
import zlib

import numpy as np

TOL = 1e-5
SEQ = 48  # longer than the scaled RoPEs' original context (32) and the sliding window (16)
THRESHOLD = 0.02  # FATReLU's: many pre-activations of the random model lie between 0 and it


def _kinds():
  base = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              max_position_embeddings=128, tie_word_embeddings=False, hidden_act="relu",
              initializer_range=0.1, bos_token_id=257, eos_token_id=257, pad_token_id=258)
  rope = lambda kind, **kw: {"rope_type": kind, "rope_theta": 10000.0, **kw}  # noqa: E731
  return {
      "llama_relu_untied": ("llama", base, rope("default")),
      "llama3_rope": ("llama", base, rope("llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=32)),
      "linear_rope": ("llama", base, rope("linear", factor=2.0)),
      "yarn_rope": ("llama", base, rope("yarn", factor=4.0, original_max_position_embeddings=32)),
      "fatrelu": ("llama", base, rope("default")),
      "mistral_sliding_window": ("mistral", {**base, "sliding_window": 16}, rope("default")),
  }


def _config(model_type: str, fields: dict, rope: dict):
  from transformers import LlamaConfig, MistralConfig
  cls = LlamaConfig if model_type == "llama" else MistralConfig
  fields = dict(fields)
  if "rope_parameters" in inspect.signature(cls.__init__).parameters:  # transformers >= 5
    fields["rope_parameters"] = rope
  else:
    fields["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    fields["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
  return cls(**fields)


def _patch_fatrelu(model, threshold: float) -> None:
  import torch
  for layer in model.model.layers:  # nn.Threshold(t, 0): x where x > t, else 0 (F.threshold)
    layer.mlp.act_fn = torch.nn.Threshold(threshold, 0.0)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_kind(name: str, model_type: str, fields: dict, rope: dict, work: str) -> dict:
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from sparse_jax import hf
  from sparse_jax.nn import forward_with_stats

  torch.manual_seed(zlib.crc32(name.encode()))
  cfg = _config(model_type, fields, rope)
  ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
  with torch.no_grad():  # norms away from 1 so that they matter
    for n, p in ref.named_parameters():
      if n.endswith("norm.weight"):
        p.mul_(1 + 0.3 * torch.randn_like(p))
  if name == "fatrelu":
    _patch_fatrelu(ref, THRESHOLD)
  src = os.path.join(work, name)
  ref.save_pretrained(src)  # safetensors, transformers' default
  if name == "fatrelu":  # ProSparse's config: the activation transformers' Llama cannot name
    with open(os.path.join(src, "config.json")) as fh:
      written = json.load(fh)
    written.update(hidden_act="fatrelu", hidden_act_param=THRESHOLD)
    with open(os.path.join(src, "config.json"), "w") as fh:
      json.dump(written, fh, indent=2)
  with open(os.path.join(src, "config.json")) as fh:
    written = json.load(fh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (2, SEQ))
  want = _torch_logits(ref, tokens)

  model, run_cfg = hf.load_hf(src)
  got, stats = forward_with_stats(model, tokens)
  got = np.asarray(got)
  out = dict(kind=name, config_written=written, model=dict(
      ffn=run_cfg.model.ffn, tie_embeddings=run_cfg.model.tie_embeddings,
      rope_scaling=run_cfg.model.rope_scaling, gate_threshold=run_cfg.model.gate_threshold,
      sliding_window=run_cfg.model.sliding_window),
      import_rel_err=_rel(got, want),
      active_per_token=[float(x) for x in np.asarray(stats.l0)], d_ff=run_cfg.model.d_ff)

  exported = os.path.join(work, name + "-export")
  files = hf.export_hf(model, exported, tokenizer="bytes", max_position_embeddings=128)
  back_kw = {}
  if name == "fatrelu":
    from transformers import AutoConfig
    back_cfg = AutoConfig.from_pretrained(exported)
    back_cfg.hidden_act = "relu"  # the module is patched below
    back_kw["config"] = back_cfg
  back = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager",
                                              **back_kw).float().eval()
  if name == "fatrelu":
    _patch_fatrelu(back, THRESHOLD)
  out["export_files"] = files
  out["export_rel_err"] = _rel(_torch_logits(back, tokens), want)
  tok = AutoTokenizer.from_pretrained(exported)
  ids = tok("hello world")["input_ids"]
  out["tokenizer_ids"] = ids
  out["tokenizer_ok"] = ids == list(b"hello world") and tok.eos_token_id == 257
  out["ok"] = (out["import_rel_err"] <= TOL and out["export_rel_err"] <= TOL
               and out["tokenizer_ok"])
  return out


def main() -> int:
  import jax
  import torch
  import transformers
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.set_num_threads(min(8, os.cpu_count() or 1))
  t0 = time.time()
  results = []
  with tempfile.TemporaryDirectory() as work:
    for name, (model_type, fields, rope) in _kinds().items():
      try:
        r = check_kind(name, model_type, fields, rope, work)
      except Exception as e:  # one kind failing should not hide the others' results
        r = dict(kind=name, ok=False, error=f"{type(e).__name__}: {e}")
      results.append(r)
      print(f"{name:24s} import {r.get('import_rel_err', float('nan')):.2e}  export "
            f"{r.get('export_rel_err', float('nan')):.2e}  tokenizer "
            f"{r.get('tokenizer_ok')}  {'ok' if r['ok'] else 'FAIL ' + r.get('error', '')}",
            flush=True)
  report = dict(
      script="experiments/check_hf_transformers.py", command=" ".join([sys.executable, *sys.argv]),
      device=str(jax.devices()[0]), jax_backend=jax.default_backend(), jax=jax.__version__,
      torch=torch.__version__, transformers=transformers.__version__,
      python=platform.python_version(), tolerance=TOL, seq_len=SEQ, wall_s=time.time() - t0,
      all_ok=all(r["ok"] for r in results), kinds=results)
  dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
  if os.environ.get("OUT"):
    dirs.append(os.environ["OUT"])
  for d in dirs:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "check_hf_transformers.json"), "w") as fh:
      json.dump(report, fh, indent=2, default=str)
  print(f"all ok: {report['all_ok']}; wrote check_hf_transformers.json to {', '.join(dirs)}")
  return 0 if report["all_ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
