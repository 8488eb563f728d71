"""Ablation sweeps: one command runs every variant x seed of a sweep file through the normal training loop.

    python -m mygpt_jax.experiments experiments/dropout.py --quick           # the documented reduced setting
    python -m mygpt_jax.experiments experiments/dropout.py --dry-run         # list the runs, train nothing
    python -m mygpt_jax.experiments experiments/dropout.py --config.train.num_epochs=5   # applies to every run

A sweep file is a small Python module (see experiments/) with module-level constants:

    BASE = "configs/verdict.py"                     # the config file every run starts from
    GRID = {"model.drop_rate": [0.0, 0.1, 0.2]}     # every combination of these values, named "drop_rate=0.1"
    VARIANTS = {"untied": {}, "tied": {"model.tie_embeddings": True}}   # or: named variants (not both)
    SEEDS = [1, 2, 3]                               # each variant is trained once per seed (train.seed)
    QUICK = ["--config.model.n_layers=4"]           # optional: the overrides --quick adds
    METRICS = ["best_val_loss", "final_val_loss"]   # optional: the columns of results.md

A run's config is BASE, then the sweep defaults (no per-epoch sample, one checkpoint kept), then the
command line's --config overrides, then the variant's overrides, then its identity: run_name
"<variant>-s<seed>", train.seed and checkpoint_dir "<checkpoint_dir>/experiments/<sweep>". Every run is
checked, and its "auto" values resolved for this backend, before anything trains. A finished run
(summary.json at its last checkpoint) is skipped, an interrupted one resumes from its checkpoint, and a run
that raises is recorded as failed while the sweep goes on. After each run the sweep directory gets
results.csv (one row per run), results.md (mean ± std over seeds per variant), val_loss.png and
best_val_loss.png.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import itertools
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from mygpt_jax import backends, checkpoint, hardware, plots, train
from mygpt_jax.config import changed_settings, get_value, run_folder, validate
from mygpt_jax.errors import ConfigError, UserError
from mygpt_jax.overrides import load_config, load_module, override_key, parse_override, set_value, split_args

# Summary values a sweep can report in results.md (results.csv always has them all): (column, format).
METRICS = {"best_val_loss": ("best val loss", ".3f"), "final_val_loss": ("final val loss", ".3f"),
           "final_train_loss": ("final train loss", ".3f"), "num_params": ("parameters", ",d"),
           "tokens_per_s": ("tokens/s", ".0f"), "wall_s": ("wall time (s)", ".0f")}
DEFAULT_METRICS = ["best_val_loss", "final_val_loss", "final_train_loss", "num_params", "tokens_per_s"]
SWEEP_DEFAULTS = {"train.sample_every_epoch": False, "train.max_to_keep": 1}
IDENTITY_KEYS = ("run_name", "checkpoint_dir", "train.seed")  # set per run by the sweep itself
SWEEP_NAMES = {"BASE", "GRID", "VARIANTS", "SEEDS", "QUICK", "METRICS"}


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str  # the sweep file, as given
    name: str  # its file name without .py: the folder under <checkpoint_dir>/experiments/
    title: str  # the first line of its docstring
    grid: bool  # variants from GRID (else from VARIANTS)
    base: str
    base_config: ml_collections.ConfigDict  # BASE's get_config() with the sweep defaults
    variants: dict[str, dict[str, Any]]  # variant name -> {dotted key: value}
    keys: list[str]  # every key some variant sets, in order of appearance
    seeds: list[int]
    metrics: list[str]
    quick: list[str]


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return self.config.run_name

    @property
    def dir(self) -> str:
        return run_folder(self.config)


# ------------------------------------------------------------------------------------------- sweep files


def _grid_variants(path: str, grid: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: GRID is empty; give it {{'<config key>': [values, ...]}}")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{path}: GRID['{key}'] is empty; give it a list of at least one value")
    variants = {}
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo, strict=True))
        name = ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items())
        if name in variants or "/" in name:
            raise ConfigError(f"{path}: GRID gives the variant name {name!r} twice or with a '/'; use VARIANTS "
                            "with explicit names")
        variants[name] = overrides
    return variants


def variant_config(sweep: Sweep, variant: str, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `base` with the variant's overrides (each key must exist and keep its type)."""
    config = copy.deepcopy(base)
    where = f"{sweep.path} ({'GRID' if sweep.grid else f'VARIANTS[{variant!r}]'})"
    for key, value in sweep.variants[variant].items():
        set_value(config, key, value, where)
    return config


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file: its settings, its BASE config, every override's key and type."""
    module = load_module(path, "sweep file")
    names = {n for n in vars(module) if n.isupper()}
    if names - SWEEP_NAMES:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(names - SWEEP_NAMES))}; a sweep file sets "
                        f"{', '.join(sorted(SWEEP_NAMES))}")
    if not isinstance(getattr(module, "BASE", None), str):
        raise ConfigError(f"{path}: set BASE to a config file, e.g. BASE = \"configs/verdict.py\"")
    has_grid, has_variants = hasattr(module, "GRID"), hasattr(module, "VARIANTS")
    if has_grid == has_variants:
        raise ConfigError(f"{path}: set exactly one of GRID (values to combine) or VARIANTS (named overrides)")
    if has_grid:
        variants = _grid_variants(path, module.GRID)
    else:
        variants = module.VARIANTS
        if not isinstance(variants, dict) or not variants:
            raise ConfigError(f"{path}: VARIANTS is empty; give it {{'<name>': {{'<config key>': value}}, ...}}")
        for name, overrides in variants.items():
            if not isinstance(name, str) or not name or "/" in name or not isinstance(overrides, dict):
                raise ConfigError(f"{path}: VARIANTS[{name!r}] must map a name without '/' to a dict of overrides")
    seeds = getattr(module, "SEEDS", None)
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(f"{path}: set SEEDS to a non-empty list of integers, e.g. SEEDS = [1, 2, 3]")
    metrics = list(getattr(module, "METRICS", DEFAULT_METRICS))
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"{path}: unknown metric {metric!r} in METRICS; use {', '.join(METRICS)}")
    quick = list(getattr(module, "QUICK", []))
    keys = list(dict.fromkeys(key for overrides in variants.values() for key in overrides))
    for key in keys:
        if key in IDENTITY_KEYS:
            raise ConfigError(f"{path}: {key} is set by the sweep for each run; it cannot be a variant's override")
    base = load_config(module.BASE, f"{path}: BASE config")
    for key, value in SWEEP_DEFAULTS.items():
        set_value(base, key, value, path)
    doc = (module.__doc__ or "").strip()
    sweep = Sweep(path=path, name=os.path.basename(path).removesuffix(".py"), title=doc.splitlines()[0] if doc else "",
                  base=module.BASE, base_config=base, grid=has_grid, variants=variants, keys=keys, seeds=list(seeds),
                  metrics=metrics, quick=quick)
    for variant in variants:
        variant_config(sweep, variant, base)
    return sweep


def make_runs(sweep: Sweep, args: Sequence[str]) -> list[Run]:
    """Every variant x seed as a validated config, seed by seed (so each variant has a result early)."""
    base = copy.deepcopy(sweep.base_config)
    for arg in args:
        key, value = parse_override(arg, base)
        if key in sweep.keys or key in ("run_name", "train.seed"):
            raise ConfigError(f"{arg}: {key} is set per run by {sweep.path}; it cannot be overridden for all runs")
        set_value(base, key, value, arg)
    root, runs = base.checkpoint_dir, []
    for seed in sweep.seeds:
        for variant in sweep.variants:
            config = variant_config(sweep, variant, base)
            config.run_name = f"{variant}-s{seed}"
            config.checkpoint_dir = os.path.join(root, "experiments", sweep.name)
            config.train.seed = seed
            try:
                validate(config)
            except UserError as e:
                raise ConfigError(f"{sweep.path}: run {config.run_name}: {e}") from None
            runs.append(Run(variant, seed, config))
    return runs


# ------------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one command does: a sweep's runs, the overrides shared by all of them, the command itself."""
    sweep: Sweep
    runs: list[Run]
    common: list[str]  # --config overrides for every run: QUICK (with --quick), then the command line's
    command: str

    @property
    def dir(self) -> str:
        return self.runs[0].config.checkpoint_dir

    @property
    def columns(self) -> list[str]:
        """The overridden keys shown in results.csv: the varied ones, then those set for every run."""
        common = [override_key(arg) for arg in self.common]
        return list(dict.fromkeys(self.sweep.keys + [k for k in common if k not in IDENTITY_KEYS]))


def finished_runs(runs: Sequence[Run]) -> dict[str, dict]:
    """The summaries of finished runs; a checkpoint made with other settings is an error before anything runs.

    A run is finished when its summary.json counts as many updates as its latest checkpoint holds (an
    interrupted run has a checkpoint but no summary, or the summary of a shorter earlier run). Settings are
    compared as a resume compares them (`config.changed_settings`).
    """
    finished = {}
    for run in runs:
        step = checkpoint.latest_step(run.dir)
        if step is None:
            continue
        diff = changed_settings(checkpoint.restore_meta(run.dir, step)["config"], run.config)
        if diff:
            raise UserError(f"{run.dir} holds a run with other settings ({'; '.join(diff[:3])}); delete it, or "
                            "keep both by passing another --config.checkpoint_dir")
        summary_path = os.path.join(run.dir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            if summary["updates"] == step:
                finished[run.name] = summary
    return finished


def one_line(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def train_run(run: Run) -> dict:
    """Train one run with its output in <run dir>/train.log; its summary, or {"error": ...} if it raised."""
    os.makedirs(run.dir, exist_ok=True)
    with open(os.path.join(run.dir, "train.log"), "a", buffering=1) as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            hardware.use_compilation_cache(run.config.compilation_cache_dir, run.config.compilation_cache_min_seconds)
            return train.train_and_evaluate(run.config)
        except Exception as e:  # any failure is reported in the results; the sweep goes on
            traceback.print_exc(file=log)
            return {"error": one_line(e)}


# ---------------------------------------------------------------------------------------------- results


def result_rows(plan: Plan, outcomes: dict[str, dict]) -> list[dict]:
    """One row per run: variant, seed, status, the overridden values, the summary's numbers, the error."""
    rows = []
    for run in plan.runs:
        outcome = outcomes.get(run.name, {})
        status = "failed" if "error" in outcome else "ok" if outcome else "pending"
        rows.append({"variant": run.variant, "seed": run.seed, "status": status,
                     **{key: get_value(run.config, key) for key in plan.columns},
                     **{metric: outcome.get(metric, "") for metric in METRICS}, "error": outcome.get("error", "")})
    return rows


def by_variant(plan: Plan, rows: list[dict], status: str | None = None) -> dict[str, list[dict]]:
    """The rows of each variant (only those with this status, if given), in the sweep's order."""
    return {v: [r for r in rows if r["variant"] == v and status in (None, r["status"])] for v in plan.sweep.variants}


def best_variant(plan: Plan, rows: list[dict]) -> str | None:
    """The variant with the lowest mean best validation loss over its finished runs."""
    means = {v: statistics.mean(r["best_val_loss"] for r in ok) for v, ok in by_variant(plan, rows, "ok").items()
             if ok}
    return min(means, key=means.get) if means else None


def mean_std(values: list, fmt: str) -> str:
    """'6.123 ± 0.045' over seeds; a single value (or an integer count, the same for all seeds) alone."""
    if not values:
        return "—"
    if len(values) == 1 or fmt == ",d":
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def write_markdown(plan: Plan, rows: list[dict], path: str) -> None:
    sweep, best = plan.sweep, best_variant(plan, rows)
    failed = [r for r in rows if r["status"] == "failed"]
    header = ["variant", *sweep.keys, "runs", *(METRICS[m][0] for m in sweep.metrics)] + ["failed"] * bool(failed)
    common = " ".join(f"`{arg}`" for arg in plan.common) or "none"
    lines = [f"# Sweep `{sweep.name}`" + (f": {sweep.title}" if sweep.title else ""), "",
             f"Command: `{plan.command}`", "",
             f"Base `{sweep.base}`; overrides for every run: {common}; seeds {', '.join(map(str, sweep.seeds))}. "
             "Mean ± standard deviation over the seeds that finished; **bold**: the lowest mean best "
             "validation loss.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, rs in by_variant(plan, rows).items():
        ok = [r for r in rs if r["status"] == "ok"]
        cells = [f"**{variant}**" if variant == best else variant,
                 *(str(rs[0][key]) for key in sweep.keys), f"{len(ok)}/{len(rs)}",
                 *(mean_std([r[m] for r in ok], METRICS[m][1]) for m in sweep.metrics)]
        if failed:
            cells.append("; ".join(f"s{r['seed']}: {r['error']}".replace("|", "\\|")
                                   for r in rs if r["status"] == "failed"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![validation loss](val_loss.png)", "", "![best validation loss](best_val_loss.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def read_curve(run: Run) -> list[dict]:
    with open(os.path.join(run.dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


LINE_STYLES = ("-", "--", ":")  # matplotlib has ten colours: the next variants reuse them, dashed


def plot_val_curves(plan: Plan, outcomes: dict[str, dict], path: str) -> None:
    """Validation loss against tokens seen: a colour per variant (and a dash pattern past ten), its seeds thin,
    their mean thick; the legend beside the axes, where it hides no curve."""
    fig, ax = plots.figure((8.5, 4.5))
    lows, highs = [], []
    for i, variant in enumerate(plan.sweep.variants):
        curves = [read_curve(run) for run in plan.runs
                  if run.variant == variant and "best_val_loss" in outcomes.get(run.name, {})]
        if not curves:
            continue
        for curve in curves:
            ax.plot([r["tokens_seen"] for r in curve], [r["val_loss"] for r in curve], color=f"C{i % 10}",
                    ls=LINE_STYLES[i // 10 % 3], lw=0.7, alpha=0.4)
        tokens = sorted(set.intersection(*({r["tokens_seen"] for r in curve} for curve in curves)))
        by_tokens = [{r["tokens_seen"]: r["val_loss"] for r in curve} for curve in curves]
        mean = [statistics.mean(c[t] for c in by_tokens) for t in tokens]
        ax.plot(tokens, mean, color=f"C{i % 10}", ls=LINE_STYLES[i // 10 % 3], lw=2.2, label=variant)
        lows.append(min(mean))
        highs.append(mean[len(mean) // 4])  # the first evaluations of a random init are far above the rest
    if lows:
        ax.set_ylim(min(lows) - 0.2, max(highs) + 0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Validation loss")
    ax.set_title(f"{plan.sweep.name}: validation loss (thin: seeds, thick: mean)")
    ax.grid(alpha=0.3)
    plots.save(fig, path)


def plot_best(plan: Plan, rows: list[dict], path: str) -> None:
    """A bar per variant: the mean best validation loss, seeds as dots, the best variant in green."""
    groups = {v: [r["best_val_loss"] for r in ok] for v, ok in by_variant(plan, rows, "ok").items() if ok}
    fig, ax = plots.figure((max(4.5, 1.1 * len(groups) + 2), 4))
    if groups:
        best = best_variant(plan, rows)
        for i, (variant, values) in enumerate(groups.items()):
            mean = statistics.mean(values)
            ax.bar(i, mean, color="C2" if variant == best else "C7", alpha=0.8)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
            ax.annotate(f"{mean:.3f}", (i, mean), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                        textcoords="offset points")
        values = [x for xs in groups.values() for x in xs]
        span = max(max(values) - min(values), 0.05)
        ax.set_ylim(min(values) - span, max(values) + 0.5 * span)
        ax.set_xticks(range(len(groups)), list(groups), rotation=20 if len(groups) > 4 else 0, fontsize=8)
    ax.set_ylabel("Best validation loss (axis cut)")
    ax.set_title(f"{plan.sweep.name}: best validation loss (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    plots.save(fig, path)


def write_results(plan: Plan, outcomes: dict[str, dict]) -> list[dict]:
    """results.csv, results.md, val_loss.png and best_val_loss.png in the sweep directory; returns the rows."""
    os.makedirs(plan.dir, exist_ok=True)
    rows = result_rows(plan, outcomes)
    with open(os.path.join(plan.dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(plan, rows, os.path.join(plan.dir, "results.md"))
    plot_val_curves(plan, outcomes, os.path.join(plan.dir, "val_loss.png"))
    plot_best(plan, rows, os.path.join(plan.dir, "best_val_loss.png"))
    return rows


# -------------------------------------------------------------------------------------------------- CLI


def run_sweep(plan: Plan) -> int:
    """Train every run that is not finished, a progress line each, results after each; returns #failed."""
    sweep, runs = plan.sweep, plan.runs
    outcomes = finished_runs(runs)
    todo = [run for run in runs if run.name not in outcomes]
    print(f"{sweep.name}: {len(sweep.variants)} variants x {len(sweep.seeds)} seeds = {len(runs)} runs in {plan.dir} "
          f"({len(runs) - len(todo)} finished earlier); each run logs to <run dir>/train.log", flush=True)
    started = time.time()
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{len(runs)}] {sweep.name} {run.name}"
        if run not in todo:
            print(f"{prefix} finished earlier: best val {outcomes[run.name]['best_val_loss']:.3f}", flush=True)
            continue
        print(f"{prefix} ...", end="", flush=True)
        run_start = time.time()
        try:
            outcomes[run.name] = outcome = train_run(run)
        except KeyboardInterrupt:
            write_results(plan, outcomes)
            print(f"\ninterrupted: {run.name} saved a checkpoint; rerun the same command to resume", file=sys.stderr)
            raise
        done = todo.index(run) + 1
        left = (time.time() - started) / done * (len(todo) - done)
        result = f"FAILED: {outcome['error']}" if "error" in outcome else f"best val {outcome['best_val_loss']:.3f}"
        eta = f"; about {left / 60:.0f} min left" if done < len(todo) else ""
        print(f" {result} ({time.time() - run_start:.0f} s{eta})", flush=True)
        write_results(plan, outcomes)
    rows = write_results(plan, outcomes)
    print(f"results: {plan.dir}/results.md, results.csv, val_loss.png, best_val_loss.png; best variant: "
          f"{best_variant(plan, rows)}")
    return sum(r["status"] == "failed" for r in rows)


def dry_run(plan: Plan) -> None:
    finished = finished_runs(plan.runs)
    common = " ".join(plan.common)
    print(f"{plan.sweep.name}: {len(plan.runs)} runs in {plan.dir} from {plan.sweep.base}"
          + (f" with {common}" if common else ""))
    for i, run in enumerate(plan.runs, 1):
        overrides = " ".join(f"--config.{k}={v}" for k, v in plan.sweep.variants[run.variant].items()) or "(base)"
        step = checkpoint.latest_step(run.dir)
        state = "finished" if run.name in finished else f"resumes from update {step}" if step is not None else "new"
        print(f"[{i}/{len(plan.runs)}] {run.name}: {overrides} -- {state}")


def parse_args(argv: Sequence[str]) -> tuple[str, bool, bool, list[str]]:
    """(sweep file, --dry-run, --quick, --config overrides), the overrides as `overrides.split_args` reads them."""
    overrides, args = split_args(argv)
    paths, options = [], {"--dry-run": False, "--quick": False}
    for arg in args:
        if arg in options:
            options[arg] = True
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}; use --dry-run, --quick or --config.<key>=<value>")
        else:
            paths.append(arg)
    if len(paths) != 1:
        raise ConfigError("give one sweep file, e.g. python -m mygpt_jax.experiments experiments/dropout.py "
                        "[--quick] [--dry-run] [--config.<key>=<value> ...]")
    return paths[0], options["--dry-run"], options["--quick"], overrides


def main(argv: Sequence[str]) -> int:
    """The command line without the program name; returns the exit status (1 if a run failed)."""
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    path, dry, quick, overrides = parse_args(argv)
    sweep = load_sweep(path)
    common = (sweep.quick if quick else []) + overrides
    plan = Plan(sweep, make_runs(sweep, common), common, f"python -m mygpt_jax.experiments {shlex.join(argv)}")
    backend = backends.current()
    print(backends.describe(), file=sys.stderr, flush=True)
    for run in plan.runs:  # before finished_runs compares them with the checkpoints, which hold resolved values
        try:
            backends.resolve(run.config, backend)
        except UserError as e:
            raise ConfigError(f"{sweep.path}: run {run.name}: {e}") from None
    if dry:
        dry_run(plan)
        return 0
    failed = run_sweep(plan)
    if failed:
        print(f"error: {failed} of {len(plan.runs)} runs failed; their errors are in results.md and results.csv",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from mygpt_jax.cli import run

    run(main, own_args=True)
