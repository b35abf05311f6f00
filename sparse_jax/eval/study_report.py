"""The L1 study's analysis and report (``experiments/study_l1.py``): settling and where the
sparsity lives, per run; the plots, the Markdown table, the paper's claims set beside the
numbers with computed verdicts, the caveats and the generated summary document.

Everything here works from the per-run JSONs (no JAX): ``run_result`` makes one from a finished
run's evaluation and training log; ``build_study`` and ``write_report`` turn a set of them into
``study.json``, ``table.md``, the plots and the document.

Settling: a(t) is the logged training EMA of active neurons per token (``l0_ema_L``, mean over
layers, EMA decay ``train.l0_ema_decay`` per step); its final value is the mean of the last
``SETTLE_TAIL`` (5) logged values; the run settles at the first logged step from which on a(t)
stays within ``SETTLE_TOL`` (10%) relative of that final value.
"""
from __future__ import annotations

import datetime
import math
import os

import numpy as np

from sparse_jax.benchmarking.results import write_json

SETTLE_TOL = 0.10
SETTLE_TAIL = 5
# Surprisal bins (1 nat wide) with fewer tokens are left out of the surprisal plot.
MIN_BIN_TOKENS = 50

# The paper's claims (../shared/PAPER.md) that the study can test, and the thresholds used to
# call agreement. Only these statements are fixed here; every verdict is computed.
PAPER = dict(
    coeff=2e-5,               # the released checkpoints' coefficient (sum_neurons)
    sparsity_pct=99.0,        # ">99% sparsity with L1" (1.5B: 29 of 5632 active, 99.5%)
    ce_rise_pct=2.0,          # "up to coeff 3e-5 the cross-entropy rises less than 2%"
    ce_coeff_max=3e-5,
    settle_steps=1000,        # "sparsity settles within ~1000 steps" (batches of 1M tokens)
    dead_pct=30.0,            # "more than 30% of neurons die permanently" (1.5B at 2e-5)
    baseline_active_pct=100 * 911 / 5632,  # 1.5B ReLU model without L1: 911 of 5632 active
    nonuniform_ratio=1.2,     # "early positions / surprising tokens activate many more": we
                              # call a ratio of at least this "more"
)



# --------------------------------------------------------------------------- measurements


def settle_step(steps: list[int], values: list[float], tol: float = SETTLE_TOL,
                tail: int = SETTLE_TAIL) -> dict:
  """The first logged step after which ``values`` stay within ``tol`` relative of their final
  value (the mean of the last ``tail``); step None when even the last value is outside."""
  if not values:
    return dict(step=None, final=None)
  final = float(np.mean(values[-tail:]))
  ok = [abs(v - final) <= tol * abs(final) for v in values]
  i = len(ok)
  while i > 0 and ok[i - 1]:
    i -= 1
  return dict(step=int(steps[i]) if i < len(steps) else None, final=final)


def _weighted(values, weights) -> float | None:
  w = np.asarray(weights, np.float64)
  return float(np.average(values, weights=w)) if w.sum() > 0 else None


def nonuniformity(res: dict) -> dict:
  """Early-position and high-surprisal ratios of one run's mean active neurons per token."""
  pos = res["by_position"]
  p = np.asarray(pos["positions"])
  active, tokens = np.asarray(pos["mean_active"]), np.asarray(pos["tokens"])
  half = p > p.max() / 2
  first = active[p == 1]
  late = _weighted(active[half], tokens[half])
  s = res["by_surprisal"]
  lo_edge, s_active, s_tok = (np.asarray(s[k]) for k in ("bin_lo", "mean_active", "tokens"))
  low = _weighted(s_active[lo_edge < 1], s_tok[lo_edge < 1])
  high = _weighted(s_active[lo_edge >= 4], s_tok[lo_edge >= 4])
  ratio = lambda a, b: None if a is None or b is None or b <= 0 else a / b  # noqa: E731
  first = float(first[0]) if len(first) else None
  return dict(first_position=first, second_half=late, position_ratio=ratio(first, late),
              surprisal_below_1=low, surprisal_4_plus=high, surprisal_ratio=ratio(high, low),
              surprisal_4_plus_tokens=int(s_tok[lo_edge >= 4].sum()))



def run_result(spec, cfg: dict, summary: dict, lm: dict, records: list[dict],
               meta: dict) -> dict:
  """The per-run JSON: final evaluation, training history, settling, non-uniformity. ``spec``
  names the run (``name``, ``ffn``, ``l1_coeff``)."""
  d_ff = lm["d_ff"]
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  steps = [r["step"] for r in train]
  ema = [float(np.mean(r["l0_ema_L"])) for r in train]
  best = min(val, key=lambda r: r["ce"]) if val else None
  layers = lm["layers"]
  tcfg = cfg["train"]
  res = dict(
      name=spec.name, ffn=spec.ffn, l1_coeff=spec.l1_coeff, l1_norm="sum_neurons",
      l1_coeff_mean_norm=spec.l1_coeff * d_ff, config=cfg, params=summary["params"],
      d_ff=d_ff, n_layers=len(layers), steps=summary["steps"], target_steps=tcfg["steps"],
      tokens=summary["steps"] * tcfg["batch_size"] * cfg["data"]["seq_len"],
      tokens_per_s=summary["tokens_per_s"], train_wall_s=meta.pop("train_wall_s"),
      val_ce=lm["ce"], val_ppl=lm["ppl"], val_tokens=lm["tokens"],
      val_ce_in_training=summary["val_ce"],
      best_val_ce=best["ce"] if best else None, best_val_step=best["step"] if best else None,
      val_ce_above_best_pct=100 * (lm["ce"] / best["ce"] - 1) if best else None,
      train_ce_last=float(np.mean([r["ce"] for r in train[-SETTLE_TAIL:]])) if train else None,
      mean_active=lm["mean_active"], sparsity_pct=lm["sparsity_pct"], dead_pct=lm["dead_pct"],
      active_per_layer=[x["mean_active"] for x in layers],
      dead_pct_per_layer=[x["dead_pct"] for x in layers],
      p50_per_layer=[x["p50"] for x in layers], p90_per_layer=[x["p90"] for x in layers],
      p99_per_layer=[x["p99"] for x in layers], max_per_layer=[x["max_active"] for x in layers],
      dead_last_train_window_pct=summary["dead_last_window_pct"],
      overflow_rows=lm["overflow_rows"], dense_fallback_calls=lm["dense_fallback_calls"],
      settle=dict(settle_step(steps, ema), definition=(
          f"first logged step from which on the training EMA of active neurons per token (mean "
          f"over layers) stays within {100 * SETTLE_TOL:g}% of its final value (mean of the "
          f"last {SETTLE_TAIL} logged values)")),
      history=dict(
          steps=steps, active_ema=ema, active=[float(np.mean(r["l0_L"])) for r in train],
          active_ema_per_layer=[[float(x) for x in r["l0_ema_L"]] for r in train],
          train_ce=[r["ce"] for r in train], val_steps=[r["step"] for r in val],
          val_ce=[r["ce"] for r in val], val_active=[float(np.mean(r["l0_L"])) for r in val]),
      by_position=dict(positions=[k + 1 for k in lm["by_position"]["keys"]],
                       tokens=lm["by_position"]["tokens"],
                       mean_active=lm["by_position"]["mean_active"]),
      by_surprisal={k: lm["by_surprisal"][k] for k in ("keys", "bin_lo", "tokens",
                                                       "mean_active")},
      **meta)
  res["settle"]["fraction_of_run"] = (None if res["settle"]["step"] is None
                                      else res["settle"]["step"] / tcfg["steps"])
  res["nonuniformity"] = nonuniformity(res)
  return res



# --------------------------------------------------------------------------- the report


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def order(results: list[dict]) -> list[dict]:
  return sorted(results, key=lambda r: (r["ffn"] != "silu_dense", r["l1_coeff"]))


def _label(r: dict, two_lines: bool = False) -> str:
  if r["ffn"] == "silu_dense":
    return "SiLU dense" if not two_lines else "SiLU\n(dense)"
  if r["l1_coeff"] == 0:
    return "ReLU, L1 0" if not two_lines else "ReLU\nL1 0"
  if not two_lines:
    return f"ReLU, L1 {r['l1_coeff']:.2g}"
  return f"{r['l1_coeff']:.2g}\n({r['l1_coeff_mean_norm']:.3g})"


def _colors(results: list[dict]) -> dict[str, object]:
  plt = _pyplot()
  l1 = [r for r in results if r["ffn"] != "silu_dense" and r["l1_coeff"] > 0]
  cmap = plt.get_cmap("viridis")
  out = {r["name"]: cmap(i / max(1, len(l1) - 1) * 0.9) for i, r in enumerate(l1)}
  for r in results:
    out.setdefault(r["name"], "tab:red" if r["ffn"] == "silu_dense" else "0.4")
  return out


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)


def _coeff_axis(ax, results):
  ax.set_xticks(range(len(results)))
  ax.set_xticklabels([_label(r, True) for r in results], fontsize=8)
  ax.set_xlabel("run: L1 coefficient, sum_neurons normalisation (mean normalisation)")
  ax.grid(alpha=0.3, which="both")


PLOTS = dict(val_loss="val_loss_vs_coeff.png", active="active_vs_coeff.png",
             dead="dead_vs_coeff.png", training="sparsity_over_training.png",
             position="active_vs_position.png", surprisal="active_vs_surprisal.png")


def _by_run(ax, x, ys, results, fmt, **kw):
  """Values over the runs: the ReLU runs joined by a line, the SiLU baseline a lone marker."""
  ys = np.asarray(ys, np.float64)
  relu = np.asarray([r["ffn"] != "silu_dense" for r in results])
  ax.plot(x[relu], ys[relu], fmt, **kw)
  if (~relu).any():
    kw.pop("label", None)
    ax.plot(x[~relu], ys[~relu], fmt.rstrip("-:").rstrip("-") or "o", **kw)


def write_plots(results: list[dict], out: str) -> dict[str, str]:
  plt = _pyplot()
  paths = {k: os.path.join(out, v) for k, v in PLOTS.items()}
  x = np.arange(len(results))
  colors = _colors(results)

  fig, ax = plt.subplots(figsize=(9, 4.5))
  _by_run(ax, x, [r["val_ce"] for r in results], results, "o-", color="C0",
          label="final validation loss")
  _by_run(ax, x, [r["best_val_ce"] for r in results], results, "s--", color="C1", mfc="none",
          label="lowest validation loss during training")
  _by_run(ax, x, [r["train_ce_last"] for r in results], results, "^:", color="C2",
          label="training loss (last logs)")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title("quality vs L1 coefficient")
  ax.legend(fontsize=8)
  _coeff_axis(ax, results)
  _save(fig, paths["val_loss"])

  for key, field, ylabel, title, log in (
      ("active", "active_per_layer", "active FFN neurons per token (validation)",
       "active neurons per layer vs L1 coefficient", True),
      ("dead", "dead_pct_per_layer", "% of neurons never active on the validation tokens",
       "dead neurons per layer vs L1 coefficient", False)):
    fig, ax = plt.subplots(figsize=(9, 4.5))
    per = np.asarray([r[field] for r in results])  # [runs, layers]
    for layer in range(per.shape[1]):
      _by_run(ax, x, per[:, layer], results, ".-", color=f"C{layer % 10}", lw=0.9, alpha=0.7,
              label=f"layer {layer}")
    _by_run(ax, x, per.mean(axis=1), results, "o-", color="k", lw=2, label="mean over layers")
    if log:
      ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    _coeff_axis(ax, results)
    _save(fig, paths[key])

  fig, (ax_a, ax_v) = plt.subplots(1, 2, figsize=(13, 4.5))
  for r in results:
    h = r["history"]
    ax_a.plot(h["steps"], h["active_ema"], color=colors[r["name"]], label=_label(r))
    s = r["settle"]["step"]
    if s is not None:
      ax_a.plot([s], [h["active_ema"][h["steps"].index(s)]], "o", color=colors[r["name"]])
    ax_v.plot(h["val_steps"], h["val_ce"], "o-", ms=3, color=colors[r["name"]], label=_label(r))
  ax_a.set_yscale("log")
  ax_a.set_ylabel("active neurons per token (training EMA, mean over layers)")
  ax_a.set_title(f"sparsity over training (dots: settled within {100 * SETTLE_TOL:g}%)")
  ax_v.set_ylabel("validation cross-entropy")
  ax_v.set_title("validation loss over training")
  for ax in (ax_a, ax_v):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  _save(fig, paths["training"])

  fig, ax = plt.subplots(figsize=(9, 4.5))
  for r in results:
    p = r["by_position"]
    ax.plot(p["positions"], p["mean_active"], lw=1, color=colors[r["name"]], label=_label(r))
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("position in the window (1 = first token)")
  ax.set_ylabel("mean active neurons per token (mean over layers)")
  ax.set_title("active neurons vs position")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  _save(fig, paths["position"])

  fig, ax = plt.subplots(figsize=(9, 4.5))
  for r in results:
    s = r["by_surprisal"]
    keep = np.asarray(s["tokens"]) >= MIN_BIN_TOKENS
    ax.plot(np.asarray(s["bin_lo"])[keep] + 0.5, np.asarray(s["mean_active"])[keep], "o-", ms=3,
            color=colors[r["name"]], label=_label(r))
  ax.set_yscale("log")
  ax.set_xlabel("surprisal of the processed token, -log p(x_t | x_<t) (nats, 1-nat bins)")
  ax.set_ylabel("mean active neurons per token (mean over layers)")
  ax.set_title(f"active neurons vs surprisal (bins with >= {MIN_BIN_TOKENS} tokens)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  _save(fig, paths["surprisal"])
  return paths


def _f(v, spec="{:.3f}"):
  return "n/a" if v is None else spec.format(v)


def _baseline(results, ffn, coeff=0.0):
  return next((r for r in results if r["ffn"] == ffn and r["l1_coeff"] == coeff), None)


def table_markdown(results: list[dict], study: dict) -> str:
  relu0 = _baseline(results, "relu_sparse")
  lines = ["| run | L1 (sum_neurons) | L1 (mean) | steps | val CE | ppl | CE vs ReLU L1 0 | "
           "lowest val CE (step) | active/token | sparsity | dead | settle step | tokens/s | "
           "wall |", "|" + " --- |" * 14]
  for r in results:
    d_ce = None if relu0 is None else 100 * (r["val_ce"] / relu0["val_ce"] - 1)
    lines.append(
        f"| {r['name']} | {r['l1_coeff']:.3g} | {r['l1_coeff_mean_norm']:.3g} | {r['steps']} | "
        f"{r['val_ce']:.4f} | {r['val_ppl']:.3f} | {_f(d_ce, '{:+.2f}%')} | "
        f"{_f(r['best_val_ce'], '{:.4f}')} ({r['best_val_step']}) | {r['mean_active']:.1f} of "
        f"{r['d_ff']} | {r['sparsity_pct']:.2f}% | {r['dead_pct']:.1f}% | "
        f"{_f(r['settle']['step'], '{}')} | {_f(r['tokens_per_s'], '{:,.0f}')} | "
        f"{r['train_wall_s']:.0f} s |")
  n_layers = results[0]["n_layers"]
  for title, field, fmt in (("Active neurons per token, per layer (validation)",
                             "active_per_layer", "{:.1f}"),
                            ("Dead neurons per layer (% never active on the validation tokens)",
                             "dead_pct_per_layer", "{:.1f}")):
    lines += ["", f"### {title}", "",
              "| run | " + " | ".join(f"L{i}" for i in range(n_layers)) + " |",
              "|" + " --- |" * (n_layers + 1)]
    lines += [f"| {r['name']} | " + " | ".join(fmt.format(v) for v in r[field]) + " |"
              for r in results]
  lines += ["", "### Where the sparsity lives (mean over layers)", "",
            "First token vs the second half of the window; tokens predicted with surprisal < 1 "
            "nat vs >= 4 nats.", "",
            "| run | position 1 | positions > L/2 | ratio | surprisal < 1 | surprisal >= 4 | "
            "ratio | tokens >= 4 nats |", "|" + " --- |" * 8]
  for r in results:
    n = r["nonuniformity"]
    lines.append(f"| {r['name']} | {_f(n['first_position'], '{:.1f}')} | "
                 f"{_f(n['second_half'], '{:.1f}')} | {_f(n['position_ratio'], '{:.2f}')} | "
                 f"{_f(n['surprisal_below_1'], '{:.1f}')} | {_f(n['surprisal_4_plus'], '{:.1f}')}"
                 f" | {_f(n['surprisal_ratio'], '{:.2f}')} | {n['surprisal_4_plus_tokens']} |")
  if study["missing"]:
    lines += ["", f"Not finished yet: {', '.join(study['missing'])}."]
  return "\n".join(lines) + "\n"


CLAIM_TITLES = dict(
    sparsity="Over 99% sparsity with L1", quality="Negligible quality loss",
    settling="Sparsity settles quickly", dead_neurons="Many dead neurons",
    early_positions="Early positions use more neurons",
    surprisal="Surprising tokens use more neurons",
    baseline_activity="Activity without L1", relu_vs_silu="ReLU gating vs SiLU gating")


def _verdict(ok: bool | None, partly: bool = False) -> str:
  if ok is None:
    return "not tested"
  return "agree" if ok else ("partly" if partly else "disagree")


def compare_claims(results: list[dict]) -> list[dict]:
  """Each testable claim of the paper with our numbers, the criterion and the verdict computed
  from them; rows with verdict "context" are comparisons, not claims of the paper."""
  relu0 = _baseline(results, "relu_sparse")
  silu = _baseline(results, "silu_dense")
  l1 = [r for r in results if r["ffn"] == "relu_sparse" and r["l1_coeff"] > 0]
  claims = []

  def add(key, paper, ours, criterion, verdict):
    claims.append(dict(claim=key, title=CLAIM_TITLES[key], paper=paper, ours=ours,
                       criterion=criterion, verdict=verdict))

  # 1. Sparsity above 99%.
  crit = (f"agree: some L1 run reaches {PAPER['sparsity_pct']:g}%; partly: the highest sparsity "
          "reaches 95%")
  paper = (f">{PAPER['sparsity_pct']:g}% of FFN activations zero with L1 (1.5B at "
           f"{PAPER['coeff']:g}: 29 of 5632 active, 99.5%)")
  if l1:
    top = max(l1, key=lambda r: r["sparsity_pct"])
    reach = [r for r in l1 if r["sparsity_pct"] >= PAPER["sparsity_pct"]]
    ours = (f"highest {top['sparsity_pct']:.2f}% ({top['mean_active']:.1f} of {top['d_ff']} "
            f"active) at L1 {top['l1_coeff']:.3g}; "
            + (f"{PAPER['sparsity_pct']:g}% or more from L1 "
               f"{min(r['l1_coeff'] for r in reach):.3g}" if reach
               else f"no coefficient reaches {PAPER['sparsity_pct']:g}%"))
    near = [r for r in l1 if 1 / 3 <= r["l1_coeff"] / PAPER["coeff"] <= 3.0]
    if near:
      ours += "; near the release's " + f"{PAPER['coeff']:g}: " + ", ".join(
          f"{r['sparsity_pct']:.2f}% at L1 {r['l1_coeff']:.3g}" for r in near)
    add("sparsity", paper, ours, crit, _verdict(bool(reach), partly=top["sparsity_pct"] >= 95))
  else:
    add("sparsity", paper, "no L1 run finished", crit, "not tested")

  # 2. Negligible quality loss up to 3e-5.
  crit = (f"agree: every coefficient <= {PAPER['ce_coeff_max']:g} raises the validation CE of "
          f"the ReLU model without L1 by less than {PAPER['ce_rise_pct']:g}%; partly: some L1 "
          "run does")
  paper = (f"cross-entropy rises <{PAPER['ce_rise_pct']:g}% up to L1 {PAPER['ce_coeff_max']:g}; "
           f"downstream accuracy 46.4% -> 46.2% at {PAPER['coeff']:g} (1.5B)")
  if relu0 and l1:
    rises = [(r, 100 * (r["val_ce"] / relu0["val_ce"] - 1)) for r in l1]
    small = [d for r, d in rises if r["l1_coeff"] <= PAPER["ce_coeff_max"] * 1.1]
    under = [r for r, d in rises if d < PAPER["ce_rise_pct"]]
    ours = "validation CE vs ReLU without L1: " + "; ".join(
        f"L1 {r['l1_coeff']:.3g}: {d:+.2f}% ({r['sparsity_pct']:.1f}% sparse)" for r, d in rises)
    if relu0["best_val_ce"] and all(r["best_val_ce"] for r in l1):
      ours += "; lowest validation CE during training, same comparison: " + "; ".join(
          f"L1 {r['l1_coeff']:.3g}: {100 * (r['best_val_ce'] / relu0['best_val_ce'] - 1):+.2f}%"
          for r in l1)
    if under:
      best = max(under, key=lambda r: r["l1_coeff"])
      ours += (f"; the largest coefficient under +{PAPER['ce_rise_pct']:g}% is "
               f"{best['l1_coeff']:.3g}, at {best['sparsity_pct']:.2f}% sparsity")
    sparse = [d for r, d in rises if r["sparsity_pct"] >= PAPER["sparsity_pct"]]
    ours += (f"; at {PAPER['sparsity_pct']:g}% sparsity or more: "
             + (", ".join(f"{d:+.2f}%" for d in sparse) if sparse else "no run, so the paper's "
                "operating point is not reached"))
    ok = all(d < PAPER["ce_rise_pct"] for d in small) if small else None
    add("quality", paper, ours, crit, _verdict(ok, partly=bool(under)))
  else:
    add("quality", paper, "needs the ReLU L1 0 run and an L1 run", crit, "not tested")

  # 3. Settling.
  crit = (f"agree: every L1 run settles by step {PAPER['settle_steps']} and in the first half "
          "of its run; partly: some do")
  paper = f"sparsity settles within ~{PAPER['settle_steps']} steps (of 1M-token batches)"
  if l1:
    ours = f"settle step (within {100 * SETTLE_TOL:g}% of the final value): " + "; ".join(
        f"L1 {r['l1_coeff']:.3g}: " + (f"step {r['settle']['step']} "
                                       f"({100 * r['settle']['fraction_of_run']:.0f}% of the run)"
                                       if r["settle"]["step"] is not None else "not settled")
        for r in l1)
    quick = [r for r in l1 if r["settle"]["step"] is not None
             and r["settle"]["step"] <= PAPER["settle_steps"]
             and r["settle"]["fraction_of_run"] <= 0.5]
    add("settling", paper, ours, crit, _verdict(len(quick) == len(l1), partly=bool(quick)))
  else:
    add("settling", paper, "no L1 run finished", crit, "not tested")

  # 4. Dead neurons.
  crit = (f"agree: at least {PAPER['dead_pct']:g}% dead at every coefficient within 3x of "
          f"{PAPER['coeff']:g}; partly: at some coefficient")
  paper = f">{PAPER['dead_pct']:g}% of neurons die permanently (1.5B at {PAPER['coeff']:g})"
  if l1:
    near = [r for r in l1 if 1 / 3 <= r["l1_coeff"] / PAPER["coeff"] <= 3.0]
    many = [r for r in l1 if r["dead_pct"] >= PAPER["dead_pct"]]
    ours = "never active on the validation tokens (mean over layers): " + "; ".join(
        f"L1 {r['l1_coeff']:.3g}: {r['dead_pct']:.1f}%" for r in l1)
    if relu0:
      ours += f"; ReLU L1 0: {relu0['dead_pct']:.1f}%"
    ok = all(r["dead_pct"] >= PAPER["dead_pct"] for r in near) if near else None
    add("dead_neurons", paper, ours, crit, _verdict(ok, partly=bool(many)))
  else:
    add("dead_neurons", paper, "no L1 run finished", crit, "not tested")

  # 5-6. Where the sparsity lives.
  for key, field, paper, what in (
      ("early_positions", "position_ratio",
       "early positions in a sequence activate many more neurons",
       "mean active at position 1 / in the second half of the window"),
      ("surprisal", "surprisal_ratio", "high-surprisal tokens activate many more neurons",
       "mean active on tokens of surprisal >= 4 nats / < 1 nat")):
    crit = (f"agree: the ratio ({what}) is at least {PAPER['nonuniform_ratio']:g} in every L1 "
            "run; partly: in some")
    rs = [r for r in l1 if r["nonuniformity"][field] is not None]
    if not rs:
      add(key, paper, "no data", crit, "not tested")
      continue
    ours = f"{what}: " + "; ".join(f"L1 {r['l1_coeff']:.3g}: {r['nonuniformity'][field]:.2f}x"
                                   for r in rs)
    if relu0 and relu0["nonuniformity"][field] is not None:
      ours += f"; ReLU L1 0: {relu0['nonuniformity'][field]:.2f}x"
    more = [r for r in rs if r["nonuniformity"][field] >= PAPER["nonuniform_ratio"]]
    add(key, paper, ours, crit, _verdict(len(more) == len(l1), partly=bool(more)))

  # Context: the baselines (numbers beside the paper's, no verdict).
  if relu0:
    pct = 100 * relu0["mean_active"] / relu0["d_ff"]
    add("baseline_activity", f"the 1.5B ReLU-gated model without L1 has 911 of 5632 neurons "
        f"({PAPER['baseline_active_pct']:.1f}%) active per token",
        f"ReLU L1 0: {relu0['mean_active']:.1f} of {relu0['d_ff']} ({pct:.1f}%) active",
        "comparison only", "context")
  if relu0 and silu:
    d = 100 * (relu0["val_ce"] / silu["val_ce"] - 1)
    add("relu_vs_silu", "", f"ReLU without L1 vs SiLU-gated: {d:+.2f}% validation CE; L1 "
        f"runs within {PAPER['ce_rise_pct']:g}% of the SiLU baseline's validation CE: "
        + (", ".join(f"{r['l1_coeff']:.3g}" for r in l1
                     if 100 * (r["val_ce"] / silu["val_ce"] - 1) < PAPER["ce_rise_pct"]) or "none"),
        "comparison only", "context")
  return claims


def caveats(results: list[dict], study: dict) -> list[str]:
  out = []
  epochs = study["epochs"]
  if epochs > 1.5:
    out.append(f"The token budget is {epochs:.1f} epochs of a {study['corpus']['bytes'] / 1e6:.1f}"
               " MB corpus, so the models see every training token several times; the paper "
               "trains on fineweb-edu for less than one epoch.")
  rising = [r for r in results if (r["val_ce_above_best_pct"] or 0) > 1.0]
  if rising:
    out.append("Validation loss ended above its lowest value (overfitting) in "
               + ", ".join(f"{r['name']} (+{r['val_ce_above_best_pct']:.1f}% vs step "
                           f"{r['best_val_step']})" for r in rising)
               + ": quality differences between coefficients then mix the cost of sparsity with"
               " L1's effect as a regulariser. The lowest validation loss is in the table too.")
  elif results:
    out.append("No run's validation loss ended more than 1% above its lowest value: no sign of "
               "overfitting at this budget.")
  r0 = results[0] if results else None
  if r0:
    out.append(f"Scale: {r0['params'] / 1e6:.1f}M parameters, d_ff {r0['d_ff']}, "
               f"{r0['n_layers']} layers, byte-level tokens, "
               f"{study['tokens_per_step']:,} tokens per step; the paper's models have 0.5-2B "
               "parameters, d_ff 5632, a 49k-token vocabulary and 1M tokens per step. In the "
               "sum_neurons normalisation every neuron's |h| gets the same penalty gradient "
               "(the coefficient) whatever d_ff, but here the penalty is added per byte rather "
               "than per BPE token of several bytes, and weighed against a byte-level "
               "cross-entropy, so a coefficient need not give the same sparsity at both scales. "
               f"The release's {PAPER['coeff']:g} is {PAPER['coeff'] * r0['d_ff']:.3g} in the "
               f"mean normalisation at this d_ff and {PAPER['coeff'] * 5632:.3g} at the paper's.")
  out.append(f"Dead neurons here are neurons that fire on none of the {study['val_tokens_eval']:,}"
             " validation tokens evaluated; the paper counts neurons that die permanently in "
             "training.")
  if study["missing"]:
    out.append(f"Incomplete: {len(study['missing'])} of {len(study['planned'])} runs are not "
               f"finished ({', '.join(study['missing'])}).")
  return out


def doc_markdown(study: dict, results: list[dict], plots: dict[str, str], doc_path: str,
                 table: str) -> str:
  rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(doc_path)))  # noqa: E731
  c = study["corpus"]
  parts = ", ".join(f"{k} {v['bytes']:,} bytes in {v['documents']} documents"
                    for k, v in (c.get("parts") or {}).items())
  r0 = results[0]
  m = r0["config"]["model"]
  t = r0["config"]["train"]
  coeffs = [r for r in results if r["ffn"] == "relu_sparse"]
  lines = [
      "# L1 sparsity study", "",
      f"Generated by `experiments/study_l1.py` from `{study['results_dir']}/study.json` "
      f"({study['generated']}). Do not edit by hand: rerun `python experiments/study_l1.py "
      f"--report-only --results {study['results_dir']} --doc {doc_path}`.", "",
      "## Setup", "",
      f"* **Model**: `{study['config']}` preset, {r0['params'] / 1e6:.1f}M parameters, "
      f"{m['n_layers']} layers, d_model {m['d_model']}, d_ff {m['d_ff']}, {m['n_heads']} heads, "
      f"compute {m['compute_dtype']}. FFN `relu_sparse` (the paper's ReLU-gated FFN) at each L1 "
      "coefficient, and `silu_dense` (the standard SiLU-gated FFN, no L1) as the baseline.",
      f"* **Data**: `{c['source']}` (Python {c['python']}): {c['documents']} documents, "
      f"{c['bytes']:,} bytes" + (f" ({parts})" if parts else "") + f"; byte tokenizer: "
      f"{c['train_tokens']:,} training and {c['val_tokens']:,} validation tokens "
      f"(val_fraction {c['val_fraction']}).",
      f"* **Budget**: {t['steps']} steps x {t['batch_size']} sequences x "
      f"{r0['config']['data']['seq_len']} tokens = {study['token_budget']:,} tokens per run "
      f"({study['epochs']:.2f} epochs of the training split); AdamW lr {t['lr']:g}, "
      f"{t['warmup_steps']} warm-up steps, cosine to {t['min_lr_ratio']:g} x lr, seed "
      f"{t['seed']}.",
      "* **L1 coefficients** (release normalisation `sum_neurons`: |h| summed over the d_ff "
      "neurons, mean over tokens and layers): "
      + ", ".join(f"{r['l1_coeff']:.3g}" for r in coeffs)
      + f". The same penalties in the paper's `mean` normalisation (x d_ff = {r0['d_ff']}): "
      + ", ".join(f"{r['l1_coeff_mean_norm']:.3g}" for r in coeffs) + ".",
      f"* **Measured on** {', '.join(study['devices'])}; command(s): "
      + "; ".join(f"`{x}`" for x in study["commands"]) + ".",
      f"* **Definitions**: active = nonzero gated activation (ReLU gate for `relu_sparse`); "
      f"statistics over {study['val_tokens_eval']:,} validation tokens; dead = never active on "
      f"them; settle step = {r0['settle']['definition']}.", "",
      "## Results", "", table, "",
      "## The paper's claims against these numbers", "",
      "| claim | paper | here | verdict |", "| --- | --- | --- | --- |"]
  tested = [x for x in study["claims"] if x["verdict"] != "context"]
  context = [x for x in study["claims"] if x["verdict"] == "context"]
  lines += [f"| {x['title']} | {x['paper']} | {x['ours']} | **{x['verdict']}** |"
            for x in tested]
  counts = {v: sum(x["verdict"] == v for x in tested)
            for v in ("agree", "partly", "disagree", "not tested")}
  lines += ["", "In short: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + ".", ""]
  words = {"agree": "agrees", "partly": "agrees in part", "disagree": "does not agree",
           "not tested": "not tested by these runs"}
  for x in tested:
    lines.append(f"* **{x['title']}**: {words[x['verdict']]}. The paper: {x['paper']}. Here: "
                 f"{x['ours']}. (Criterion: {x['criterion']}.)")
  if context:
    lines += ["", "Context (numbers beside the paper's, no verdict):", ""]
    lines += [f"* **{x['title']}**: " + (f"the paper: {x['paper']}; " if x["paper"] else "")
              + f"here: {x['ours']}." for x in context]
  lines += ["", "## Caveats", ""] + [f"* {x}" for x in study["caveats"]]
  lines += ["", "## Plots", ""] + [f"![{k}]({rel(v)})" for k, v in plots.items()]
  return "\n".join(lines) + "\n"


def check_finite(obj, where="study") -> None:
  if isinstance(obj, float) and not math.isfinite(obj):
    raise ValueError(f"{where} is not finite: {obj}")
  if isinstance(obj, dict):
    for k, v in obj.items():
      check_finite(v, f"{where}.{k}")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      check_finite(v, f"{where}[{i}]")


SUMMARY_FIELDS = (
    "name", "ffn", "l1_coeff", "l1_norm", "l1_coeff_mean_norm", "params", "d_ff", "n_layers",
    "steps", "tokens", "tokens_per_s", "train_wall_s", "invocations", "val_ce", "val_ppl",
    "val_tokens", "val_ce_in_training", "best_val_ce", "best_val_step", "val_ce_above_best_pct",
    "train_ce_last", "mean_active", "sparsity_pct", "dead_pct", "active_per_layer",
    "dead_pct_per_layer", "p50_per_layer", "p90_per_layer", "p99_per_layer", "max_per_layer",
    "dead_last_train_window_pct", "overflow_rows", "dense_fallback_calls", "settle",
    "nonuniformity", "device", "command", "date")


def build_study(results: list[dict], *, results_dir: str, planned: list[str]) -> dict:
  """The study summary (``study.json``) of the per-run results (same config, ordered by
  ``order``): settings, corpus, token budget, per-run summaries, the claims and the caveats."""
  r0 = results[0]
  found = {r["name"] for r in results}
  t, data = r0["config"]["train"], r0["config"]["data"]
  study = dict(
      generated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      results_dir=results_dir, config=r0["config"]["name"],
      devices=sorted({r["device"] for r in results}),
      commands=sorted({r["command"] for r in results}),
      model=r0["config"]["model"], data=data, train={k: v for k, v in t.items()
                                                    if k not in ("l1_coeff", "max_minutes")},
      corpus=r0["corpus"], token_budget=t["steps"] * t["batch_size"] * data["seq_len"],
      tokens_per_step=t["batch_size"] * data["seq_len"],
      epochs=t["steps"] * t["batch_size"] * data["seq_len"] / r0["corpus"]["train_tokens"],
      val_tokens_eval=r0["val_tokens"], l1_norm="sum_neurons",
      coefficients=[r["l1_coeff"] for r in results if r["ffn"] == "relu_sparse"],
      coefficients_mean_norm=[r["l1_coeff_mean_norm"] for r in results
                              if r["ffn"] == "relu_sparse"],
      settle_definition=r0["settle"]["definition"], planned=planned,
      missing=[n for n in planned if n not in found],
      runs=[{k: r.get(k) for k in SUMMARY_FIELDS} for r in results])
  study["claims"] = compare_claims(results)
  study["caveats"] = caveats(results, study)
  check_finite(study)
  check_finite(study)
  return study


def write_report(study: dict, results: list[dict], *, results_dir: str, doc: str) -> dict:
  """Writes the plots, ``study.json``, ``table.md`` (in ``results_dir``) and the document
  ``doc``; prints the table and the verdicts; returns ``study`` with its plot names."""
  os.makedirs(results_dir, exist_ok=True)
  plots = write_plots(results, results_dir)
  table = table_markdown(results, study)
  study["plots"] = {k: os.path.basename(v) for k, v in plots.items()}
  write_json(os.path.join(results_dir, "study.json"), study, indent=1, allow_nan=False)
  with open(os.path.join(results_dir, "table.md"), "w") as f:
    f.write(table)
  os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
  with open(doc, "w") as f:
    f.write(doc_markdown(study, results, plots, doc, table))
  print(table)
  print("claims: " + "; ".join(f"{x['claim']}: {x['verdict']}" for x in study["claims"]))
  print(f"report: {results_dir}/ (study.json, table.md, {len(plots)} plots), {doc}")
  return study

