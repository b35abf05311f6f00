"""The dense-vs-sparse row files of ``experiments/bench_model.py``: one row per (config, mode,
sparsity), each side (dense, sparse) measured by a job of its own, rows of separate invocations
merged; the paper's reference numbers; memory estimates; the plot.

Memory estimate (bytes; P parameters, M = batch x seq tokens, V vocab, D d_model, F d_ff, L
layers; ``estimate_peak_bytes``): train = 16 P (fp32 params, grads, AdamW m and v) + 2 P (bf16
weight copies) + 12 M V (fp32 logits, their gradient, the loss's softmax) + 2 M D L (block inputs
kept by remat) + M (12 F + 24 D) (one block's recomputed activations and gradients); forward = 2 P
(bf16 params) + 4 M V (fp32 logits) + M (6 F + 12 D). With the defaults (forward batch 64, train
batch 16, seq 2048):

    config  params   forward b64   train b16   train b32
    0.5b    0.51 B     34.4 GB      33.4 GB     57.7 GB
    1b      1.03 B     35.5 GB      44.0 GB     69.6 GB
    1.5b    1.54 B     36.5 GB      54.6 GB     81.5 GB
    2b      2.05 B     37.5 GB      65.2 GB     93.5 GB

so the defaults fit an H200 (139 GB, children may use 95% of it) with room for what the estimate
leaves out (XLA's fusion temporaries, cuDNN workspaces), and also an H100 (80 GB). The 2b training
state alone (fp32 master weights + AdamW) is 16 x 2.05 B = 33 GB.
"""
from __future__ import annotations

import os

import numpy as np

from sparse_jax.benchmarking.results import fmt, format_table, load_json, write_json
from sparse_jax.config import ModelConfig, get_config

MODES = ("forward", "train")
VARIANTS = ("dense", "sparse")

# PAPER.md, "Reported results (H100)". The energy figures are listed with the 2B results; their
# ratio (0.829) matches the inference speedup (1.207), so they are compared with forward rows.
PAPER_REFERENCE = {
    "device": "NVIDIA H100 (the paper's own measurements, PAPER.md)",
    "forward": {"2b": {"tokens_per_ms_dense": 87.8, "tokens_per_ms_sparse": 106.0,
                       "speedup": 1.205, "mj_per_token_dense": 7.85,
                       "mj_per_token_sparse": 6.51}},
    "train": {"2b": {"speedup": 1.219},
              "1b": {"peak_gb_dense": 44.5, "peak_gb_sparse": 33.1, "peak_ratio": 33.1 / 44.5}},
    "notes": "inference = full forward of batch 64 x 2048 tokens; energy from NVML power "
             "integrated over time; sparsity of trained models (1.5B: ~29 of 5632 active, "
             "99.5%); the training batch of the memory figure is not given",
}


# ------------------------------------------------------------------------------ estimates


def param_count(m: ModelConfig) -> int:
  """Parameters of a decoder config (tied embeddings), without building it."""
  hd = m.attn_head_dim
  attn = m.d_model * hd * (2 * m.n_heads + 2 * m.kv_heads)
  ffn = (3 if m.ffn != "relu_nongated_sparse" else 2) * m.d_ff * m.d_model
  return m.vocab_size * m.d_model + m.n_layers * (attn + ffn + 2 * m.d_model) + m.d_model


def estimate_peak_bytes(m: ModelConfig, mode: str, batch: int, seq: int) -> int:
  """Rough peak device memory of one timed call (module docstring); XLA's own figure is
  recorded next to it."""
  p, tokens = param_count(m), batch * seq
  v, d, f, n = m.vocab_size, m.d_model, m.d_ff, m.n_layers
  if mode == "forward":
    return 2 * p + 4 * tokens * v + tokens * (6 * f + 12 * d)
  kept = 2 * tokens * d * n if m.remat else tokens * n * (12 * f + 24 * d)
  return 18 * p + 12 * tokens * v + kept + tokens * (12 * f + 24 * d)

def activity_fields(act: dict, d_ff: int) -> dict:
  """Row fields of ``sparse_jax.calibrate.measure_activity``'s per-layer walk."""
  return dict(sparsity_measured_walk=float(1.0 - np.mean(act["active_fraction_L"])),
              walk_active_per_token_L=[round(float(v), 3) for v in act["active_per_token_L"]],
              walk_p50_L=act["p50_L"].tolist(), walk_p99_L=act["p99_L"].tolist(),
              walk_max_L=[int(v) for v in act["max_L"]])


def op_stats_fields(l0_L, fallback_L, overflow_L, d_ff) -> dict:
  """Row fields of the sparse op's own per-layer statistics."""
  l0 = np.asarray(l0_L, np.float64)
  return dict(sparsity_measured=float(1.0 - l0.mean() / d_ff),
              op_active_per_token_L=[round(float(v), 3) for v in l0],
              dense_fallback_L=[float(v) for v in np.asarray(fallback_L, np.float64)],
              dense_fallback_share=float(np.mean(np.asarray(fallback_L, np.float64))),
              overflow_rows_L=[int(v) for v in np.asarray(overflow_L)])


def row_key(r: dict) -> tuple:
  return (r.get("device"), r["config"], r["mode"], r.get("sparsity_target"), r.get("profile"),
          r.get("batch"), r.get("seq"), r.get("dense_baseline"), r.get("sparse_impl"),
          tuple(r.get("overrides") or ()), r.get("data"))


# Row fields that come from the sparse job (besides the *_sparse ones).
SPARSE_KEYS = ("sparsity_measured", "op_active_per_token_L", "dense_fallback_L",
               "dense_fallback_share", "overflow_rows_L", "sparsity_measured_walk",
               "walk_active_per_token_L", "walk_p50_L", "walk_p99_L", "walk_max_L",
               "calib_alpha_L", "calib_fit_active_fraction_L", "calib_check_active_fraction_L",
               "calib_settings", "dispatch_pattern", "dispatch_settling", "dispatch_hot_cold",
               "dispatch_compile_s")


def _measured(row: dict, v: str) -> bool:
  return row.get(f"tokens_per_ms_{v}") is not None


def _variant_fields(lv: dict, v: str) -> dict:
  """The row fields of one successful level of the ``v`` job."""
  out = {f"tokens_per_ms_{v}": lv["tokens_per_ms"], f"ms_per_call_{v}": lv["s_per_call"] * 1e3,
         f"window_s_{v}": lv["window_s"], f"calls_per_window_{v}": lv["calls_per_window"],
         f"mj_per_token_{v}": lv.get("mj_per_token"), f"avg_power_w_{v}": lv.get("avg_power_w"),
         f"energy_method_{v}": lv.get("energy_method"), f"energy_error_{v}": lv.get("energy_error"),
         f"peak_bytes_{v}": lv.get("peak_bytes"),
         f"memory_analysis_{v}": lv.get("memory_analysis"),
         f"peak_bytes_in_use_{v}": lv.get("peak_bytes_in_use"),
         f"compile_s_{v}": lv.get("compile_s"),
         f"build_calibrate_s_{v}": lv.get("build_calibrate_s"),
         f"sparsity_measured_walk_{v}": lv.get("sparsity_measured_walk"),
         f"resolved_config_{v}": lv.get("resolved_config")}
  if "final_loss" in lv:
    out[f"final_loss_{v}"] = lv["final_loss"]
  if v == "dense":
    # The dense model's own count of active neurons (train: the timed step's statistics).
    out["sparsity_measured_dense"] = lv.get("sparsity_measured")
  else:
    out.update({k: lv[k] for k in SPARSE_KEYS if k in lv})
  return out


def _derive(row: dict) -> dict:
  """Ratios and fallbacks computed from the measured fields."""
  if row.get("sparsity_measured") is None:
    row["sparsity_measured"] = row.get("sparsity_measured_walk_sparse",
                                       row.get("sparsity_measured_walk_dense"))
  for k in ("tokens_per_ms", "mj_per_token", "peak_bytes"):
    for v in VARIANTS:
      row.setdefault(f"{k}_{v}", None)
  ratio = lambda a, b: a / b if a and b else None
  row["speedup"] = ratio(row["tokens_per_ms_sparse"], row["tokens_per_ms_dense"])
  row["peak_ratio"] = ratio(row["peak_bytes_sparse"], row["peak_bytes_dense"])
  row["energy_ratio"] = ratio(row["mj_per_token_sparse"], row["mj_per_token_dense"])
  # Same weights and tokens: the losses of the two models agree up to bf16 rounding.
  ld, ls = row.get("final_loss_dense"), row.get("final_loss_sparse")
  row["final_loss_rel_diff"] = abs(ls - ld) / abs(ld) if ld and ls is not None else None
  return row


def make_rows(jobs_done: list[tuple[dict, dict]], run: dict) -> list[dict]:
  """One row per (config, mode, sparsity level) from its dense and sparse job results."""
  rows: dict[tuple, dict] = {}
  for spec, res in jobs_done:
    levels = res.get("levels") or [dict(lv, error=res.get("error", "no result"))
                                   for lv in spec["levels"]]
    v = spec["variant"]
    for lv in levels:
      target = lv.get("target")
      row = rows.setdefault((spec["config"], spec["mode"], target), dict(
          device=res.get("device") or run.get("device"), jax=res.get("jax") or run.get("jax"),
          command=run["command"], date=run["date"], config=spec["config"], mode=spec["mode"],
          sparsity_target=target, profile=spec["profile"] if target is not None else None,
          batch=spec["batch"], seq=spec["seq"], tokens_per_call=spec["batch"] * spec["seq"],
          dense_baseline=spec["dense_baseline"], overrides=spec["overrides"],
          data=spec["data"], sparse_impl=spec.get("sparse_impl_label"),
          nvml_device=res.get("nvml_device"), measured_in={}))
      row["device"] = row["device"] or res.get("device")
      if lv.get("params") is not None:
        row.update(params=lv["params"], n_layers=lv.get("n_layers"), d_ff=lv.get("d_ff"),
                   model={k: x for k, x in lv.get("model", {}).items()
                          if k not in ("ffn", "ffn_impl")})
      if "error" in lv:
        row[f"error_{v}"] = lv["error"]
        continue
      row.update(_variant_fields(lv, v))
      row["measured_in"][v] = dict(command=run["command"], date=run["date"])
  out = []
  for row in rows.values():
    paper = PAPER_REFERENCE.get(row["mode"], {}).get(row["config"])
    if paper:
      row["paper"] = paper
    out.append(_derive(row))
  return out


def _combine(new: dict, old: dict) -> dict:
  """``new`` with the side(s) it lacks taken from ``old`` (same key: device, config, mode,
  sparsity, batch, seq, settings), so the two models of a row may come from two invocations."""
  row = dict(new)
  for v in VARIANTS:
    if _measured(row, v) or not _measured(old, v):
      continue
    if row.get(f"error_{v}"):
      row["rerun_errors"] = {**row.get("rerun_errors", {}), v: row[f"error_{v}"]}
    for k in list(row):
      if k.endswith(f"_{v}") or (v == "sparse" and k in SPARSE_KEYS):
        del row[k]
    row.update({k: x for k, x in old.items() if (k.endswith(f"_{v}") and k != f"error_{v}")
                or (v == "sparse" and k in SPARSE_KEYS)})
    row["measured_in"] = {**row.get("measured_in", {}),
                          v: old.get("measured_in", {}).get(v, dict(command=old.get("command"),
                                                                    date=old.get("date")))}
  return _derive(row)


def merge_results(path: str, run: dict, rows: list[dict]) -> dict:
  """Writes ``rows`` into the JSON at ``path`` (atomically), merged with what it holds."""
  data = dict(benchmark="experiments/bench_model.py", paper=PAPER_REFERENCE,
              definitions=DEFINITIONS, runs=[], records=[])
  old = load_json(path)
  if old is not None:
    data["runs"] = old.get("runs", [])
    data["records"] = old.get("records", [])
  data["runs"] = [r for r in data["runs"] if r.get("run_id") != run["run_id"]] + [run]
  index = {row_key(r): i for i, r in enumerate(data["records"])}
  for row in rows:
    i = index.get(row_key(row))
    if i is None:
      index[row_key(row)] = len(data["records"])
      data["records"].append(row)
    else:
      data["records"][i] = _combine(row, data["records"][i])
  write_json(path, data)
  return data


DEFINITIONS = {
    "tokens_per_ms": "batch x seq / (median window wall time / calls per window), in ms",
    "mj_per_token": "NVML energy of the timed windows (whole board) / tokens processed",
    "peak_bytes": "XLA compiled memory_analysis of the timed function: argument + output + "
                  "temp - alias bytes",
    "peak_bytes_in_use": "device allocator peak of the job's process (memory_stats)",
    "sparsity_measured": "1 - mean over layers of the sparse op's active neurons per token / "
                         "d_ff on the timed batch (forward: stats pass; train: last timed step)",
    "sparsity_measured_walk": "the same from the dense FFN, layer by layer, on up to "
                              "calib_batch sequences of the timed batch (not seen in calibration)",
    "dense_fallback_share": "share of layers whose sparse op ran its dense path",
    "speedup": "tokens_per_ms_sparse / tokens_per_ms_dense",
    "final_loss": "next-token cross-entropy on the timed batch (train: the step's loss; "
                  "forward: the first 4 sequences), a check that both models compute the same "
                  "function (final_loss_rel_diff)",
    "dispatch_pattern": "train with train.dispatch=auto_host: the per-layer pattern (S sparse, D "
                        "dense, a number: hot neurons) the host dispatcher settled on after "
                        "--settle-steps decisions (dispatch_settling: after each), whose step "
                        "was timed",
    "dispatch_compile_s": "seconds to compile each pattern's training step while settling "
                          "(compile_s_sparse is the settled pattern's)",
}




def format_rows(rows: list[dict]) -> str:
  head = ("config", "mode", "target", "measured", "batch", "dense tok/ms", "sparse tok/ms",
          "speedup", "dense mJ/tok", "sparse mJ/tok", "peak D GB", "peak S GB", "dense path",
          "note")
  out = []
  for r in rows:
    note = "; ".join(f"{v}: {r[f'error_{v}'][:60]}" for v in VARIANTS if r.get(f"error_{v}"))
    out.append((r["config"], r["mode"], fmt(r["sparsity_target"], ".4g"),
                fmt(r.get("sparsity_measured"), ".4f"), str(r["batch"]),
                fmt(r["tokens_per_ms_dense"], ".1f"), fmt(r["tokens_per_ms_sparse"], ".1f"),
                fmt(r.get("speedup"), ".3f"), fmt(r["mj_per_token_dense"], ".3f"),
                fmt(r["mj_per_token_sparse"], ".3f"),
                fmt(r["peak_bytes_dense"] and r["peak_bytes_dense"] / 1e9, ".1f"),
                fmt(r["peak_bytes_sparse"] and r["peak_bytes_sparse"] / 1e9, ".1f"),
                fmt(r.get("dense_fallback_share"), ".2f"), note))
  return format_table(head, out)


def plot(data: dict, path: str, device: str | None) -> str | None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in data["records"] if r.get("speedup") is not None and r.get("params")
          and (device is None or r.get("device") == device)]
  if not rows:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, mode in zip(axes, MODES):
    series: dict = {}
    for r in rows:
      if r["mode"] == mode:
        label = (f"sparsity {r['sparsity_target']}" if r["sparsity_target"] is not None
                 else "checkpoint") + f", batch {r['batch']}"
        series.setdefault(label, []).append((r["params"] / 1e9, r["speedup"], r["config"]))
    for label, pts in sorted(series.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
      for x, y, config in pts:
        ax.annotate(config, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for config, ref in PAPER_REFERENCE.get(mode, {}).items():
      if "speedup" in ref:
        p = param_count(get_config(config).model) / 1e9
        ax.plot([p], [ref["speedup"]], "k*", ms=12, label=f"paper {config} (H100)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title(f"{mode}: sparse / dense tokens per ms")
    ax.set_xlabel("parameters (B)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("speedup")
  fig.suptitle(f"bench_model: {device or 'all devices'}")
  fig.tight_layout()
  png = os.path.splitext(path)[0] + ".png"
  fig.savefig(png, dpi=120)
  plt.close(fig)
  return png


