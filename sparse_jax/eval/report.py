"""The evaluation report: PNG plots (matplotlib, Agg), ``report.json`` and ``report.md``."""
from __future__ import annotations

import json
import os

import numpy as np

PLOTS = {
    "layers": "sparsity_by_layer.png",
    "distribution": "active_distribution.png",
    "position": "sparsity_by_position.png",
    "surprisal": "sparsity_by_surprisal.png",
    "neurons": "neuron_firing.png",
}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _pyplot().close(fig)


def _layer_lines(ax, xs, per_layer, mean, label_mean="mean over layers"):
  # Individual layers as thin lines when few enough to tell apart; the mean always.
  if len(per_layer) <= 12:
    for layer, ys in enumerate(per_layer):
      ax.plot(xs, ys, lw=0.8, alpha=0.6, label=f"layer {layer}")
  ax.plot(xs, mean, "k", lw=2, label=label_mean)


def plot_layers(lm: dict, path: str) -> None:
  plt = _pyplot()
  layers = lm["layers"]
  idx = np.arange(len(layers))
  fig, (ax_a, ax_d) = plt.subplots(1, 2, figsize=(12, 4))
  ax_a.bar(idx, [x["mean_active"] for x in layers], color="tab:blue", label="mean")
  for key, marker in (("p50", "_"), ("p90", "v"), ("p99", "^")):
    ax_a.plot(idx, [x[key] for x in layers], marker, color="k", ls="none", label=key)
  ax_a.set_xlabel("layer")
  ax_a.set_ylabel(f"active FFN neurons per token (of {lm['d_ff']})")
  ax_a.set_title(f"active neurons per layer (mean {lm['mean_active']:.1f}, "
                 f"{lm['sparsity_pct']:.2f}% zero)")
  ax_a.legend(fontsize=8)
  ax_d.bar(idx, [x["dead_pct"] for x in layers], color="tab:red")
  ax_d.set_xlabel("layer")
  ax_d.set_ylabel("% of neurons")
  ax_d.set_title(f"dead neurons (never fire on the {lm['tokens']:,} evaluation tokens)")
  for ax in (ax_a, ax_d):
    ax.set_xticks(idx)
    ax.grid(alpha=0.3, axis="y")
  _save(fig, path)


def plot_distribution(hist_LxA: np.ndarray, path: str) -> None:
  plt = _pyplot()
  fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(12, 4))
  pooled = hist_LxA.sum(axis=0)
  top = int(np.flatnonzero(pooled)[-1]) + 1
  ax_h.bar(np.arange(top), pooled[:top] / pooled.sum(), width=1.0, color="tab:blue")
  ax_h.set_yscale("log")
  ax_h.set_xlabel("active neurons in a token's FFN")
  ax_h.set_ylabel("share of (token, layer) pairs")
  ax_h.set_title("distribution, all layers")
  counts = np.arange(hist_LxA.shape[1])
  for layer, hist in enumerate(hist_LxA):
    at_least = hist[::-1].cumsum()[::-1] / hist.sum()  # P(active >= a)
    kept = (counts >= 1) & (at_least > 0)
    ax_c.plot(counts[kept], at_least[kept], lw=1, label=f"layer {layer}" if layer < 12 else None)
  ax_c.set_xscale("log")
  ax_c.set_yscale("log")
  ax_c.set_xlabel("a (active neurons)")
  ax_c.set_ylabel("P(active >= a)")
  ax_c.set_title("tail per layer")
  if hist_LxA.shape[0] <= 12:
    ax_c.legend(fontsize=7)
  for ax in (ax_h, ax_c):
    ax.grid(alpha=0.3, which="both")
  _save(fig, path)


def plot_position(profile: dict, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  xs = np.asarray(profile["keys"]) + 1
  _layer_lines(ax, xs, profile["mean_active_per_layer"], profile["mean_active"])
  ax.set_xscale("log")
  ax.set_xlabel("position in the sequence (1 = first token)")
  ax.set_ylabel("mean active FFN neurons per token")
  ax.set_title("sparsity vs position")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_surprisal(by_surprisal: dict, by_next_loss: dict, path: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  titles = ("surprisal of the token processed: -log p(x_t | x_<t)",
            "next-token loss at the position: -log p(x_t+1 | x_<=t)")
  for ax, prof, title in zip(axes, (by_surprisal, by_next_loss), titles):
    xs = np.asarray(prof["bin_lo"]) + 0.5
    _layer_lines(ax, xs, prof["mean_active_per_layer"], prof["mean_active"])
    ax.set_xlabel("nats (1-nat bins; the last bin is open-ended)")
    ax.set_ylabel("mean active FFN neurons per token")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    tokens = ax.twinx()
    tokens.bar(xs, prof["tokens"], width=0.8, alpha=0.2, color="gray")
    tokens.set_yscale("log")
    tokens.set_ylabel("tokens in the bin (bars)", color="gray")
    ax.set_zorder(tokens.get_zorder() + 1)  # lines over the bars
    ax.patch.set_visible(False)
  _save(fig, path)


def plot_neurons(fired_LxF: np.ndarray, n_tokens: int, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  rate_LxF = np.sort(fired_LxF / n_tokens, axis=1)[:, ::-1]
  rank = np.arange(1, rate_LxF.shape[1] + 1)
  for layer, rate in enumerate(rate_LxF):
    live = rate > 0
    ax.plot(rank[live], rate[live], lw=1, label=f"layer {layer}" if layer < 12 else None)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("neuron rank (most often active first; dead neurons are not drawn)")
  ax.set_ylabel("share of tokens on which the neuron fires")
  ax.set_title("per-neuron firing frequency")
  ax.grid(alpha=0.3, which="both")
  if rate_LxF.shape[0] <= 12:
    ax.legend(fontsize=7)
  _save(fig, path)


def write_plots(lm: dict, arrays: dict[str, np.ndarray], out: str) -> dict[str, str]:
  paths = {k: os.path.join(out, v) for k, v in PLOTS.items()}
  plot_layers(lm, paths["layers"])
  plot_distribution(arrays["active_hist_LxA"], paths["distribution"])
  plot_position(lm["by_position"], paths["position"])
  plot_surprisal(lm["by_surprisal"], lm["by_next_token_loss"], paths["surprisal"])
  plot_neurons(arrays["fired_tokens_LxF"], lm["tokens"], paths["neurons"])
  return paths


def _fmt(v, spec="{:.3f}"):
  return "n/a" if v is None else spec.format(v)


def position_highlights(profile: dict) -> list[tuple[str, float]]:
  """Mean active neurons over position ranges 1, 2-4, 5-16, 17-64, ... (1-based)."""
  mean = np.asarray(profile["mean_active"])
  tokens = np.asarray(profile["tokens"], np.float64)
  pos = np.asarray(profile["keys"]) + 1
  out, lo = [], 1
  for hi in (1, 4, 16, 64, 256, 1024, 4096, 16384):
    sel = (pos >= lo) & (pos <= hi)
    if sel.any():
      label = f"{lo}" if lo == hi else f"{lo}-{min(hi, int(pos.max()))}"
      out.append((label, float(np.average(mean[sel], weights=tokens[sel]))))
    lo = hi + 1
  return out


def markdown(report: dict) -> str:
  lines = [f"# Evaluation of {report['checkpoint']}", ""]
  m = report["model"]
  lines += [f"Model: {m['n_layers']} layers, d_model {m['d_model']}, d_ff {m['d_ff']}, FFN "
            f"`{m['ffn']}`, compute {m['compute_dtype']}, {report['params'] / 1e6:.2f}M "
            f"parameters. Tokenizer: `{report['tokenizer']}`.", ""]
  lm = report.get("lm")
  if lm:
    lines += [
        "## Language modelling", "",
        f"Data: {report['data']}; {lm['tokens']:,} tokens in {lm['batches']} batches of "
        f"windows of {lm['seq_len']} tokens.", "",
        "| metric | value |", "| --- | --- |",
        f"| cross-entropy (nats/token) | {lm['ce']:.4f} |",
        f"| perplexity | {lm['ppl']:.3f} |",
        f"| bits per token | {lm['bits_per_token']:.4f} |",
        f"| active FFN neurons per token (mean over layers) | {lm['mean_active']:.2f} of "
        f"{lm['d_ff']} |",
        f"| activation sparsity | {lm['sparsity_pct']:.2f}% |",
        f"| dead neurons (mean over layers) | {lm['dead_pct']:.2f}% |",
        f"| sparse-op overflow rows / dense fallbacks | {lm['overflow_rows']} / "
        f"{lm['dense_fallback_calls']} |", "",
        "### Per layer", "",
        "| layer | mean active | sparsity | p50 | p90 | p99 | max | dead | tokens with 0 active |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['layer']} | {x['mean_active']:.2f} | {x['sparsity_pct']:.2f}% | {x['p50']} "
              f"| {x['p90']} | {x['p99']} | {x['max_active']} | {x['dead_neurons']} "
              f"({x['dead_pct']:.1f}%) | {x['zero_active_tokens_pct']:.1f}% |"
              for x in lm["layers"]]
    lines += ["", "### By position (mean over layers)", "", "| positions | mean active |",
              "| --- | --- |"]
    lines += [f"| {label} | {v:.2f} |" for label, v in position_highlights(lm["by_position"])]
    s, nl = lm["by_surprisal"], lm["by_next_token_loss"]
    lines += ["", "### By surprisal (mean over layers)", "",
              "Surprisal of the processed token, -log p(x_t | x_<t), and the next-token loss at "
              "the same position, in nats.", "",
              "| nats | tokens | mean active (surprisal) | tokens | mean active (next loss) |",
              "| --- | --- | --- | --- | --- |"]
    by_bin = {k: (t, v) for k, t, v in zip(nl["keys"], nl["tokens"], nl["mean_active"])}
    keys = list(dict.fromkeys(s["keys"] + nl["keys"]))
    surprisal = {k: (t, v) for k, t, v in zip(s["keys"], s["tokens"], s["mean_active"])}
    for k in keys:
      a, b = surprisal.get(k), by_bin.get(k)
      lines.append(f"| {k} | {a[0] if a else 0} | {_fmt(a and a[1], '{:.2f}')} | "
                   f"{b[0] if b else 0} | {_fmt(b and b[1], '{:.2f}')} |")
    lines += ["", "### Plots", ""]
    lines += [f"![{k}]({v})" for k, v in PLOTS.items()]
  tasks = report.get("multiple_choice") or []
  if tasks:
    lines += ["", "## Zero-shot multiple choice", "",
              "acc: highest log-likelihood; acc_norm: highest log-likelihood per character of the "
              "choice (lm-evaluation-harness). Standard errors: sqrt(p(1-p)/(n-1)).", "",
              "| task | format | n | chance | acc | acc_norm |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {t['task']} | {t['format']} | {t['n']} | {t['chance']:.3f} | "
              f"{t['acc']:.4f} ± {_fmt(t['acc_stderr'], '{:.4f}')} | "
              f"{t['acc_norm']:.4f} ± {_fmt(t['acc_norm_stderr'], '{:.4f}')} |" for t in tasks]
  lines += ["", f"Wall time {report['wall_s']:.1f} s on {report['device']}.", ""]
  return "\n".join(lines)


def _json_default(v):
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, np.generic):
    return v.item()
  raise TypeError(f"cannot write {type(v).__name__} to JSON")


def write_report(report: dict, out: str) -> tuple[str, str]:
  json_path, md_path = os.path.join(out, "report.json"), os.path.join(out, "report.md")
  with open(json_path, "w") as fh:
    json.dump(report, fh, indent=1, default=_json_default)
  with open(md_path, "w") as fh:
    fh.write(markdown(report))
  return json_path, md_path
