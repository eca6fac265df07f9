"""Training curves from a run's metrics.jsonl: loss, learning rate, speed, gradient norm and each stage's own metrics.

`draw_runs` puts one or several runs on one figure, a panel per kind of metric, train and validation together;
`write_curves` is what every stage calls at the end of its run (checkpoint/<stage>/curves.png). Drawn with
matplotlib's object API (no pyplot), so nothing needs a display and no global state changes.
"""

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter

from dataset import read_jsonl

NOT_METRICS = ("step", "tokens", "split", "time")
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Panel:
    """One plot: the metrics it draws (fnmatch patterns of names; a validation record's `val_x` is metric x)."""

    title: str
    ylabel: str
    metrics: tuple[str, ...]
    percent: bool = False  # fractions drawn as %
    log_if_wide: bool = False  # log scale when the values span a decade or more
    tick_format: str = ""  # "eng": 2k, 1.5M; "g": 0.002, 1.5e-06 (never an offset above the axis)


PANELS = (
    Panel("loss", "loss (nats / token)", ("loss",), log_if_wide=True),
    Panel("learning rate", "learning rate", ("lr",), tick_format="g"),
    Panel("throughput", "tokens / s", ("tokens_per_s",), tick_format="eng"),
    Panel("model FLOPs utilisation", "MFU (% of peak)", ("mfu",), percent=True),
    Panel("gradient norm", "global L2 norm, before clipping", ("grad_norm",), log_if_wide=True),
    Panel("answer accuracy (greedy, exact match)", "correct answers (%)", ("answer_acc*",), percent=True),
    Panel("DPO reward accuracy", "pairs with chosen > rejected (%)", ("rewards/accuracy",), percent=True),
    Panel("DPO reward margin", "chosen - rejected reward (nats)", ("rewards/margin",)),
    Panel("DPO rewards", "beta x log-ratio to reference (nats)", ("rewards/chosen", "rewards/rejected")),
    Panel("DPO log-probabilities", "reply log-probability (nats)", ("logps/*",)),
    Panel("MoE expert shares", "share of routed tokens (%)", ("moe_share_e*", "moe_max_share"), percent=True),
    Panel("MoE load-balancing loss", "auxiliary loss", ("moe_aux_loss",)),
)


def read_metrics(run_dir) -> dict[str, list[dict]]:
    """The train and val records of run_dir/metrics.jsonl, in step order. Where a resumed run logged a step
    again, the later record wins. A bad line raises a ValueError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (it is written while a training stage runs)")
    by_step: dict[str, dict[int, dict]] = {"train": {}, "val": {}}
    for line, record in read_jsonl(path):
        if not isinstance(record.get("step"), int) or record.get("split") not in by_step:
            raise ValueError(f"{path}:{line}: not a metrics record (needs an integer 'step' and split 'train' or "
                             "'val')")
        by_step[record["split"]][record["step"]] = record
    return {split: [records[s] for s in sorted(records)] for split, records in by_step.items()}


def curves(metrics: dict[str, list[dict]], x_key: str) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{metric: {split: (x values, metric values)}}; a val record's `val_x` is metric x."""
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for split, records in metrics.items():
        for key in dict.fromkeys(k for r in records for k in r if k not in NOT_METRICS):
            xs, ys = series(records, key, x_key)
            if np.isfinite(ys).any():  # a metric that is nan throughout (answer_acc_zh without Chinese) is left out
                out.setdefault(key.removeprefix("val_") if split == "val" else key, {})[split] = (xs, ys)
    return out


def panels_for(names: list[str]) -> list[tuple[Panel, list[str]]]:
    """The panels that have something to draw, each with its metrics; a metric no panel knows (a new stage's)
    gets a panel of its own."""
    out, left = [], list(names)
    for panel in PANELS:
        mine = [n for n in left if any(fnmatch.fnmatchcase(n, p) for p in panel.metrics)]
        if mine:
            out.append((panel, sorted(mine)))
            left = [n for n in left if n not in mine]
    return out + [(Panel(name, name, (name,)), [name]) for name in sorted(left)]


def series(records: list[dict], key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """(x values, metric values) of the records that hold the key (and the x field)."""
    points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(x) is not None]
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def spans_a_decade(values: np.ndarray) -> bool:
    """Whether positive values reach from v to 10 v or more (then a log scale shows them better)."""
    values = values[np.isfinite(values)]
    return len(values) > 0 and values.min() > 0 and values.max() >= 10 * values.min()


def _extrapolating_interp(x, xp, fp):
    """np.interp, continued past both ends with the mean slope (a top axis must map the whole visible range)."""
    slope = (fp[-1] - fp[0]) / (xp[-1] - xp[0])
    x = np.asarray(x, dtype=float)
    return np.where(x < xp[0], fp[0] + (x - xp[0]) * slope,
                    np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * slope, np.interp(x, xp, fp)))


def add_tokens_axis(ax, records: list[dict]):
    """A top axis in tokens seen, for a panel drawn against steps (when the run recorded tokens)."""
    steps, tokens = series(records, "tokens", "step")
    keep = np.concatenate([[True], np.diff(tokens) > 0])  # strictly increasing, so the map inverts
    steps, tokens = steps[keep], tokens[keep]
    if len(steps) < 2:
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: _extrapolating_interp(s, steps, tokens),
                                               lambda t: _extrapolating_interp(t, tokens, steps)))
    top.set_xlabel("tokens seen", fontsize=8)
    top.xaxis.set_major_formatter(EngFormatter(sep=""))
    top.tick_params(labelsize=7)


def draw_runs(run_dirs: list, out, x: str = "steps") -> Path:
    """Draw the runs' curves, overlaid, into the PNG `out`, against x = "steps" or "tokens"; return out."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(run_dirs, x).savefig(out)
    return out


def figure(run_dirs: list, x: str = "steps") -> Figure:
    """The runs' curves, overlaid: a panel per kind of metric (PANELS), train lines and val points."""
    if x not in ("steps", "tokens"):
        raise ValueError(f"x must be steps or tokens, not {x!r}")
    runs = {_label(d, run_dirs): read_metrics(d) for d in run_dirs}
    x_key = "step" if x == "steps" else "tokens"
    if x == "tokens":
        for label, metrics in runs.items():
            if not any("tokens" in r for r in metrics["train"] + metrics["val"]):
                raise ValueError(f"{label}: its metrics.jsonl records no tokens (an older run); draw it against steps")
    drawn = {label: curves(metrics, x_key) for label, metrics in runs.items()}
    panels = panels_for(list(dict.fromkeys(name for run in drawn.values() for name in run)))
    if not panels:
        raise ValueError(f"{', '.join(map(str, run_dirs))}: no metrics to draw yet")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.1 * rows), dpi=100, layout="constrained")
    for i, (panel, names) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = []
        for r, (label, run) in enumerate(drawn.items()):
            for m, name in enumerate(names):
                for split, (xs, ys) in run.get(name, {}).items():
                    ys = ys * 100 if panel.percent else ys
                    values.append(ys)
                    # One run: a colour per metric, val dashed. Several: a colour per run, a line style per metric.
                    if len(drawn) == 1:
                        colour, style = f"C{m % 10}", "-" if split == "train" else "--"
                    else:
                        colour, style = f"C{r % 10}", LINE_STYLES[m % len(LINE_STYLES)]
                    parts = ([label] if len(drawn) > 1 else []) + ([name] if len(names) > 1 else []) + [split]
                    ax.plot(xs, ys, color=colour, linestyle=style, marker="o" if split == "val" else None,
                            label=" ".join(parts), markersize=3, linewidth=1.2)
        if panel.log_if_wide and spans_a_decade(np.concatenate(values)):
            ax.set_yscale("log")
        if panel.percent:  # no negative percentages, and room above an all-zero line
            ax.set_ylim(0, max(ax.get_ylim()[1], 1))
        if panel.tick_format == "eng":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        elif panel.tick_format == "g":
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        elif ax.get_yscale() == "linear":
            ax.ticklabel_format(axis="y", useOffset=False)  # an offset label would collide with the top axis
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("optimizer step" if x == "steps" else "tokens seen", fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        elif len(runs) == 1:
            metrics = next(iter(runs.values()))
            add_tokens_axis(ax, sorted(metrics["train"] + metrics["val"], key=lambda r: r["step"]))
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(" vs ".join(runs), fontsize=10)
    return fig


def _label(run_dir, run_dirs: list) -> str:
    """A run's name in legends: its directory's name, or its path where two runs share a name."""
    names = [Path(d).name for d in run_dirs]
    return Path(run_dir).name if names.count(Path(run_dir).name) == 1 else str(run_dir)


def write_curves(run_dir) -> str:
    """Draw run_dir/curves.png; return a line to log. Never raises: a figure is not worth a finished run."""
    try:
        return f"wrote {draw_runs([run_dir], Path(run_dir) / 'curves.png')}"
    except Exception as e:  # noqa: BLE001 (any plotting failure, matplotlib's included, is only reported)
        return f"could not draw the training curves of {run_dir} ({type(e).__name__}: {e})"
