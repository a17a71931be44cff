"""``opd report``: compare finished (or crashed) runs in one HTML page with PNG plots.

A run directory is what :func:`opd.trainer.train` writes: ``config.yaml`` (the resolved
config) and ``metrics.jsonl`` (one JSON object per line, each with a ``step``), plus
optionally ``checkpoints/`` and ``final/``. :func:`write_report` reads any number of them
and writes into ``out_dir``:

* ``loss.png``, ``divergence.png``, ``accuracy.png``, ``first_error.png`` (metrics over
  steps), ``first_error_curve.png`` (the final first-error survival curve) and the
  training-time diagnostics of :mod:`opd.diagnostics` over steps: ``topk_overlap.png``,
  ``calibration.png``, ``length.png`` and ``stops.png`` (EOS / truncated / empty samples),
  every plot comparing all runs on shared axes; a plot no run has data for is skipped;
* ``index.html``: the plots, the resolved configs side by side (rows that differ between
  runs highlighted), a compute summary per run and the command line that produced it.

Only those files are (over)written; anything else in ``out_dir`` is left alone. Lines of
``metrics.jsonl`` that do not parse (e.g. one cut short by a crash) are skipped and counted.
Plots are drawn with matplotlib's Agg canvas directly, so no display and no pyplot state
are involved.
"""

from __future__ import annotations

import html
import json
import math
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opd.errors import OpdError

__all__ = ["PLOT_FILES", "RunData", "load_run", "write_report"]

# The files write_report owns in out_dir (nothing else there is touched).
PLOT_FILES = {
    "loss": "loss.png",
    "divergence": "divergence.png",
    "accuracy": "accuracy.png",
    "first_error": "first_error.png",
    "first_error_curve": "first_error_curve.png",
    # training-time diagnostics (opd.diagnostics, eval.diagnostics)
    "topk_overlap": "topk_overlap.png",
    "calibration": "calibration.png",
    "length": "length.png",
    "stops": "stops.png",
}
INDEX_FILE = "index.html"

# loss/*_mean keys that are not divergences (surrogates and likelihoods).
_NOT_DIVERGENCE = {"loss/pg_mean", "loss/nll_mean", "loss/single_step_mean"}
_COMPUTE_KEYS = ("compute/student_generated_tokens", "compute/teacher_scored_tokens",
                 "compute/teacher_generated_tokens")
_PHASES = (("rollout", "perf/rollout_s"), ("teacher", "perf/teacher_s"), ("student", "perf/student_s"))


@dataclass
class RunData:
    """One run directory, parsed."""

    path: Path
    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    skipped_lines: int = 0
    has_final: bool = False
    checkpoints: int = 0
    _series_cache: dict[str, list[tuple[int, Any]]] = field(default_factory=dict, repr=False)

    def series(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` for every row holding ``key``, by step; a later row wins a repeated step."""
        if key not in self._series_cache:
            by_step: dict[int, Any] = {}
            for row in self.rows:
                if key in row:
                    by_step[row["step"]] = row[key]
            self._series_cache[key] = sorted(by_step.items(), key=lambda item: item[0])
        return self._series_cache[key]

    def scalars(self, key: str) -> list[tuple[int, float]]:
        """Like :meth:`series`, numbers only (``"nan"``/``"inf"`` strings written by the logger become floats)."""
        out = []
        for step, value in self.series(key):
            number = _number(value)
            if number is not None:
                out.append((step, number))
        return out

    def keys(self) -> set[str]:
        return {key for row in self.rows for key in row}

    def last(self, key: str) -> float | None:
        values = self.scalars(key)
        return values[-1][1] if values else None


# --- reading ----------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}:
        return float(value)
    return None


def _check_run_dir(path: Path) -> None:
    if not path.exists():
        raise OpdError(f"{path}: no such directory (expected an opd run directory)")
    if not path.is_dir():
        raise OpdError(f"{path}: not a directory (expected an opd run directory)")
    missing = [name for name in ("metrics.jsonl", "config.yaml") if not (path / name).is_file()]
    if missing:
        raise OpdError(f"{path} is not an opd run directory: missing {' and '.join(missing)}")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of a ``metrics.jsonl`` with an integer ``step``, and how many lines were skipped."""
    rows: list[dict[str, Any]] = []
    skipped = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1  # e.g. a line cut short by a crash
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            skipped += 1
            continue
        rows.append(row)
    return rows, skipped


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys, in file order (``{"loss": {"beta": 0.5}}`` -> ``{"loss.beta": 0.5}``)."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def load_run(path: Path, name: str | None = None) -> RunData:
    """Parse one run directory; :class:`OpdError` when it is not one."""
    path = Path(path)
    _check_run_dir(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(errors="replace"))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpdError(f"{path / 'config.yaml'} is not valid YAML: {first}") from None
    rows, skipped = read_metrics(path / "metrics.jsonl")
    checkpoints = path / "checkpoints"
    return RunData(
        path=path,
        name=name if name is not None else _dir_name(path),
        config=flatten_config(config or {}),
        rows=rows,
        skipped_lines=skipped,
        has_final=(path / "final").is_dir(),
        checkpoints=sum(1 for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else 0,
    )


def _dir_name(path: Path) -> str:
    return path.name or path.resolve().name or str(path)


def unique_names(paths: Sequence[Path], names: Sequence[str] | None = None) -> list[str]:
    """Run labels: ``names`` if given, else directory names (``parent/name`` when those clash), deduplicated."""
    if names is not None:
        if len(names) != len(paths):
            raise OpdError(f"--names has {len(names)} name(s) for {len(paths)} run directories")
        wanted = [str(n).strip() or _dir_name(Path(p)) for n, p in zip(names, paths)]
    else:
        wanted = [_dir_name(Path(p)) for p in paths]
        for i, path in enumerate(paths):
            if wanted.count(wanted[i]) > 1:
                resolved = Path(path).resolve()
                wanted[i] = f"{resolved.parent.name}/{resolved.name}" if resolved.parent.name else wanted[i]
    out: list[str] = []
    for label in wanted:
        candidate, n = label, 2
        while candidate in out:
            candidate = f"{label} ({n})"
            n += 1
        out.append(candidate)
    return out


# --- derived numbers -----------------------------------------------------------------


def cumulative_total(values: Iterable[float]) -> float:
    """Final value of a cumulative counter that restarts from zero on each resume.

    The trainer counts compute per invocation, so after ``--resume`` the logged counter
    drops; every drop starts a new segment and the segments' last values are added up.
    """
    total, previous = 0.0, None
    for value in values:
        if not math.isfinite(value):
            continue
        if previous is not None and value < previous:
            total += previous
        previous = value
    return total + (previous or 0.0)


def _sum(run: RunData, key: str) -> tuple[float, int]:
    values = [v for _, v in run.scalars(key) if math.isfinite(v)]
    return sum(values), len(values)


def compute_summary(run: RunData) -> list[tuple[str, str]]:
    """``(label, formatted value)`` rows of the compute table for one run."""
    train_steps = [step for step, _ in run.series("loss/total")]
    configured = run.config.get("train.steps")
    last_step = max(train_steps) if train_steps else None
    rows: list[tuple[str, str]] = []
    steps_text = "-" if last_step is None else str(last_step)
    if isinstance(configured, int):
        steps_text += f" / {configured}"
    rows.append(("steps (last logged / configured)", steps_text))
    rows.append(("training rows logged", str(len(train_steps))))
    wall, n_wall = _sum(run, "perf/step_s")
    wall_text = _fmt_seconds(wall) if n_wall else "-"
    if n_wall and last_step is not None and n_wall < last_step:
        wall_text += f" (only {n_wall} of {last_step} steps logged)"
    rows.append(("wall time (sum of perf/step_s)", wall_text))
    for phase, key in _PHASES:
        total, n = _sum(run, key)
        share = f" ({100 * total / wall:.0f}%)" if n and wall > 0 else ""
        rows.append((f"{phase} time", _fmt_seconds(total) + share if n else "-"))
    tokens, n_tok = _sum(run, "train/completion_tokens")
    rows.append(("completion tokens trained on (logged steps)", _fmt_number(tokens) if n_tok else "-"))
    if n_tok and wall > 0:
        rows.append(("tokens / s (logged steps)", _fmt_number(tokens / wall)))
    for key in _COMPUTE_KEYS:
        values = [v for _, v in run.scalars(key)]
        rows.append((key.split("/", 1)[1].replace("_", " "), _fmt_number(cumulative_total(values)) if values else "-"))
    rows.append(("final model saved", "yes" if run.has_final else "no"))
    rows.append(("checkpoints kept", str(run.checkpoints)))
    eval_steps = [step for step, _ in run.series("eval/accuracy")]
    rows.append(("final eval step", str(eval_steps[-1]) if eval_steps else "-"))
    eval_keys = sorted(k for k in run.keys() if k.startswith("eval/") and run.scalars(k))
    for key in eval_keys:
        value = run.last(key)
        rows.append((key, _fmt_number(value) if value is not None else "-"))
    if run.skipped_lines:
        rows.append(("unparsable metrics lines skipped", str(run.skipped_lines)))
    return rows


def _fmt_number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _fmt_seconds(value: float) -> str:
    if value >= 120:
        return f"{value / 60:.1f} min ({value:.0f} s)"
    return f"{value:.3g} s"


def _fmt_config(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


# --- plots -----------------------------------------------------------------------------


def _legend_label(text: str) -> str:
    # matplotlib hides labels starting with "_" and parses "$...$" as maths.
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(_legend_label(title))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


_STYLES = ("-", "--", ":", "-.")


def _plot_over_steps(
    runs: Sequence[RunData], keys: Sequence[str], path: Path, title: str, ylabel: str,
    ylim: tuple[float, float] | None = None,
) -> list[str]:
    """One line per (run, key) present; colour = run, line style = key. Returns the keys drawn."""
    drawn: list[str] = []
    lines = []
    for index, run in enumerate(runs):
        for k_index, key in enumerate(keys):
            points = run.scalars(key)
            if not points:
                continue
            if key not in drawn:
                drawn.append(key)
            lines.append((index, k_index, run.name, key, points))
    if not lines:
        return []
    fig, ax = _new_axes(title, "step", ylabel)
    colours = _colours(len(runs))
    for index, k_index, name, key, points in lines:
        label = name if len(keys) == 1 else f"{name}: {key}"
        if key == "loss/divergence_mean" and isinstance(runs[index].config.get("loss.divergence"), str):
            label += f" ({runs[index].config['loss.divergence']})"
        ax.plot([s for s, _ in points], [v for _, v in points], linestyle=_STYLES[k_index % len(_STYLES)],
                color=colours[index], marker="o" if len(points) <= 40 else None, markersize=3,
                label=_legend_label(label))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return drawn


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _final_curve(run: RunData, key: str) -> tuple[int, list[float]] | None:
    for step, value in reversed(run.series(key)):
        if isinstance(value, list) and value:
            numbers = [_number(v) for v in value]
            if all(v is not None for v in numbers):
                return step, [float(v) for v in numbers if v is not None]
    return None


def _plot_survival(runs: Sequence[RunData], path: Path) -> list[str]:
    keys = ("eval/first_error_curve", "eval/first_error_curve_sampled")
    lines = []
    for index, run in enumerate(runs):
        for k_index, key in enumerate(keys):
            found = _final_curve(run, key)
            if found:
                lines.append((index, k_index, run.name, key, *found))
    if not lines:
        return []
    fig, ax = _new_axes("first-error survival (final eval)", "k (words)", "fraction with the first k words correct")
    colours = _colours(len(runs))
    for index, k_index, name, _key, step, curve in lines:
        mode = "greedy" if k_index == 0 else "sampled"
        ax.plot(range(1, len(curve) + 1), curve, linestyle=_STYLES[k_index], color=colours[index], marker="o",
                markersize=3, label=_legend_label(f"{name}: {mode} (step {step})"))
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return sorted({line[3] for line in lines})


def divergence_keys(runs: Sequence[RunData]) -> list[str]:
    """Divergence-like keys any run logged: ``loss/*_mean`` (not surrogates), ``teacher/*kl*_mean``, eval."""
    found: set[str] = set()
    for run in runs:
        for key in run.keys():
            if key.startswith("loss/") and key.endswith("_mean") and key not in _NOT_DIVERGENCE:
                found.add(key)
            elif key.startswith("teacher/") and key.endswith("_mean") and "kl" in key:
                found.add(key)
    ordered = sorted(found, key=lambda k: (k != "loss/divergence_mean", k))
    return [*ordered, "eval/teacher_divergence"]


@dataclass
class _Plot:
    key: str
    title: str
    file: str
    drawn: list[str]
    why_missing: str


def _make_plots(runs: Sequence[RunData], out_dir: Path) -> list[_Plot]:
    specs: list[tuple[str, str, list[str], str, str, tuple[float, float] | None]] = [
        ("loss", "training loss", ["loss/total"], "loss/total", "loss", None),
        ("divergence", "divergence to the teacher", divergence_keys(runs),
         "loss/*_mean divergences or eval/teacher_divergence", "per-token divergence", None),
        ("accuracy", "eval accuracy", ["eval/accuracy", "eval/accuracy_sampled"],
         "eval/accuracy or eval/accuracy_sampled", "accuracy", (-0.02, 1.02)),
        ("first_error", "mean first-error position", ["eval/first_error", "eval/first_error_sampled"],
         "eval/first_error or eval/first_error_sampled", "words before the first error", None),
    ]
    plots = []
    for key, title, keys, needed, ylabel, ylim in specs:
        drawn = _plot_over_steps(runs, keys, out_dir / PLOT_FILES[key], title, ylabel, ylim)
        plots.append(_Plot(key, title, PLOT_FILES[key], drawn, f"no run logged {needed}"))
    drawn = _plot_survival(runs, out_dir / PLOT_FILES["first_error_curve"])
    plots.append(_Plot("first_error_curve", "first-error survival curve (final eval)",
                       PLOT_FILES["first_error_curve"], drawn, "no run logged eval/first_error_curve"))
    # training-time diagnostics (opd.diagnostics: eval.diagnostics)
    diagnostics: list[tuple[str, str, list[str], str, str, tuple[float, float] | None]] = [
        ("topk_overlap", "top-k overlap on student samples",
         ["eval/topk_teacher_mass", "eval/topk_student_mass_in_teacher", "eval/topk_teacher_mass_in_student",
          "eval/topk_sampled_outside_teacher"], "eval/topk_*", "probability mass / fraction of tokens",
         (-0.02, 1.02)),
        ("calibration", "teacher success continuing answers cut at 25/50/75 %",
         ["eval/calibration_student_prefix", "eval/calibration_teacher_prefix", "eval/calibration_ratio"],
         "eval/calibration_*", "success rate (ratio: student / own prefixes)", None),
        ("length", "length of student samples", ["eval/student_length_mean"], "eval/student_length_mean",
         "tokens", None),
        ("stops", "how student samples end",
         ["eval/student_eos_fraction", "eval/student_truncated_fraction", "eval/student_empty_fraction"],
         "eval/student_*_fraction", "fraction of samples", (-0.02, 1.02)),
    ]
    for key, title, keys, needed, ylabel, ylim in diagnostics:
        drawn = _plot_over_steps(runs, keys, out_dir / PLOT_FILES[key], title, ylabel, ylim)
        plots.append(_Plot(key, title, PLOT_FILES[key], drawn, f"no run logged {needed}"))
    return plots


# --- HTML ------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.diff td { background: #fff3c4; }
td.key { font-family: monospace; white-space: nowrap; }
td.val { font-family: monospace; word-break: break-all; }
.plot { margin: 1em 0; } .plot img { max-width: 100%; border: 1px solid #ddd; }
.skipped { color: #888; font-style: italic; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _config_table(runs: Sequence[RunData]) -> tuple[str, list[str]]:
    keys: list[str] = []
    seen: set[str] = set()
    for run in runs:
        for key in run.config:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    missing = object()
    differing = []
    body = []
    for key in keys:
        values = [run.config.get(key, missing) for run in runs]
        differs = len(runs) > 1 and any(v != values[0] for v in values[1:])
        if differs:
            differing.append(key)
        cells = "".join(
            f'<td class="val">{"<i>absent</i>" if v is missing else _e(_fmt_config(v))}</td>' for v in values
        )
        row_class = ' class="diff"' if differs else ""
        body.append(f'<tr{row_class}><td class="key">{_e(key)}</td>{cells}</tr>')
    head = "<tr><th>key</th>" + "".join(f"<th>{_e(run.name)}</th>" for run in runs) + "</tr>"
    return f"<table>\n{head}\n" + "\n".join(body) + "\n</table>", differing


def _compute_table(runs: Sequence[RunData]) -> str:
    summaries = [compute_summary(run) for run in runs]
    labels: list[str] = []
    for summary in summaries:
        for label, _ in summary:
            if label not in labels:
                labels.append(label)
    head = "<tr><th></th>" + "".join(f"<th>{_e(run.name)}</th>" for run in runs) + "</tr>"
    body = []
    for label in labels:
        cells = "".join(f'<td class="val">{_e(dict(summary).get(label, "-"))}</td>' for summary in summaries)
        body.append(f'<tr><td class="key">{_e(label)}</td>{cells}</tr>')
    return f"<table>\n{head}\n" + "\n".join(body) + "\n</table>"


def _html(runs: Sequence[RunData], plots: Sequence[_Plot], command: str) -> str:
    written = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e('opd report: ' + ', '.join(run.name for run in runs))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e('opd report')}</h1>",
        f"<p>{_e(f'{len(runs)} run(s); report written {written}.')}</p>",
        "<table><tr><th>run</th><th>directory</th></tr>",
        *(f'<tr><td>{_e(run.name)}</td><td class="val">{_e(run.path)}</td></tr>' for run in runs),
        "</table>",
        f"<h2>{_e('Plots')}</h2>",
    ]
    for plot in plots:
        if plot.drawn:
            alt = f"{plot.title}: {', '.join(plot.drawn)}"
            parts.append(f'<div class="plot"><h3>{_e(plot.title)}</h3>'
                         f'<img src="{_e(plot.file)}" alt="{_e(alt)}"></div>')
        else:
            parts.append(f'<div class="plot"><h3>{_e(plot.title)}</h3>'
                         f'<p class="skipped">{_e(f"skipped: {plot.why_missing}")}</p></div>')
    parts.append(f"<h2>{_e('Compute')}</h2>")
    parts.append(_compute_table(runs))
    note = ("Wall time sums perf/step_s (rollout + teacher + student + optimizer); evaluation and "
            "checkpointing are not included. Token counters add up across resumes.")
    parts.append(f"<p>{_e(note)}</p>")
    table, differing = _config_table(runs)
    parts.append(f"<h2>{_e('Resolved configs')}</h2>")
    if len(runs) > 1:
        summary = (f"{len(differing)} key(s) differ (highlighted): {', '.join(differing)}" if differing
                   else "the configs are identical")
        parts.append(f"<p>{_e(summary)}</p>")
    parts.append(table)
    parts.append(f"<h2>{_e('Command')}</h2>")
    parts.append(f"<pre>{_e(command)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _default_command(run_dirs: Sequence[Path], out_dir: Path, names: Sequence[str] | None) -> str:
    argv = ["opd", "report", *(str(p) for p in run_dirs), "-o", str(out_dir)]
    if names is not None:
        argv += ["--names", ",".join(names)]
    return shlex.join(argv)


def write_report(
    run_dirs: list[Path], out_dir: Path, names: list[str] | None = None, *, command: str | None = None
) -> Path:
    """Compare ``run_dirs`` in ``out_dir/index.html`` (plus PNG plots); returns the index.html path.

    ``names`` label the runs (default: the directory names, deduplicated); ``command`` is the
    command line shown in the page (default: the equivalent ``opd report`` invocation).
    Raises :class:`OpdError` for a path that is not a run directory or an unusable ``out_dir``.
    """
    run_dirs = [Path(p) for p in run_dirs]
    out_dir = Path(out_dir)
    if not run_dirs:
        raise OpdError("opd report needs at least one run directory")
    for path in run_dirs:
        _check_run_dir(path)
    labels = unique_names(run_dirs, names)
    if out_dir.exists() and not out_dir.is_dir():
        raise OpdError(f"{out_dir} exists and is not a directory; choose another output directory")
    runs = [load_run(path, label) for path, label in zip(run_dirs, labels)]
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _make_plots(runs, out_dir)
    index = out_dir / INDEX_FILE
    tmp = out_dir / f".{INDEX_FILE}.tmp"
    tmp.write_text(_html(runs, plots, command or _default_command(run_dirs, out_dir, names)), encoding="utf-8")
    tmp.replace(index)
    return index
