"""The experiment report: results with 95% intervals over seeds, paired differences between
methods, one figure per metric against steps, a reward-vs-FD plot and a captioned sample grid,
as `report.md` and a self-contained, responsive `report.html` (images inlined).

Input: the SFT starting point's metrics, the evaluation's real-image reference (`RealReference`,
saved beside the report) and, per method, the post-training runs (one per seed) whose
`eval.jsonl` files `ranke posttrain` wrote (`ranke.train.posttrain.evaluate_step`). Runs of two
methods are paired by their training seed (`seed` in the run's config.yaml).
"""

from __future__ import annotations

import base64
import html
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
import yaml
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ranke.eval.stats import Interval, gain_interval, mean_interval, paired_interval, verdict  # noqa: E402
from ranke.images import grid_tiles, save_image_grid  # noqa: E402

# (metrics key, title, format, which way is better)
COLUMNS = (
    ("reward", "reward (toy CLIP, train)", "{:.2f}", "higher"),
    ("clip_score", "CLIP score (eval toy CLIP)", "{:.2f}", "higher"),
    ("fd", "FD (toy features)", "{:.1f}", "lower"),
    ("kid", "KID (toy features)", "{:.3f}", "lower"),
    # FD taken apart (ranke.eval.manifold): fidelity (precision, density) and diversity (recall, coverage)
    ("precision", "precision (toy features)", "{:.3f}", "higher"),
    ("recall", "recall (toy features)", "{:.3f}", "higher"),
    # no better direction: about 1 for samples distributed as the real images, above 1 where they crowd
    # into dense real regions (a policy collapsing onto typical images raises it), unbounded
    ("density", "density (toy features)", "{:.3f}", None),
    ("coverage", "coverage (toy features)", "{:.3f}", "higher"),
    ("verifier_accuracy", "verifier accuracy", "{:.3f}", "higher"),
    ("token_kl", "token KL (nats)", "{:.3f}", "lower"),
    ("roundtrip_agreement", "round-trip agreement", "{:.3f}", "higher"),
    # the real images' ground-truth codes through the same decoder: the row's reference for the one above
    ("roundtrip_agreement_real", "round-trip agreement, real codes", "{:.3f}", "higher"),
    # no better direction: real images are the reference (a reward that favours vivid colour raises it)
    ("colorfulness", "colorfulness", "{:.1f}", None),
)
SHORT = {"reward": "reward", "clip_score": "CLIP score", "fd": "FD", "kid": "KID", "precision": "precision",
         "recall": "recall", "density": "density", "coverage": "coverage", "verifier_accuracy": "verifier accuracy",
         "token_kl": "token KL", "roundtrip_agreement": "round-trip agreement",
         "roundtrip_agreement_real": "round-trip agreement of real codes", "colorfulness": "colorfulness"}  # fmt: skip
# The comparisons the report makes when both methods are present: (A, B) gives A - B.
COMPARISONS = (
    ("RankE", "GRPO"),
    ("RankE, top-4 rank-weighted", "RankE, top-4 uniform GAN"),
    ("RankE", "RankE, no EMA anchor"),
    ("RankE", "decoder only"),
    ("GRPO policy, adapted decoder", "GRPO"),  # the mechanism: the same GRPO policy, frozen vs adapted decoder
)
SAMPLE_METHODS = ("GRPO", "RankE")  # the columns of the sample grid beside the real image and SFT
SAMPLE_PROMPTS = 8
PARETO_LABELS = 6  # step labels per trajectory at most (evenly spread, the last one included)
PREVIEW_NROW = 8  # the evaluation grids hold their images 8 per row (ranke.train.posttrain.evaluate_step)


@dataclass
class Method:
    """One row group of the report: a method, the decoder its table row uses, and its runs."""

    name: str  # e.g. "GRPO", "RankE"
    decoder: str  # decoder whose metrics make the row: base (frozen), ema or online
    runs: list[Path]  # one run directory per seed
    note: str = ""
    extra_decoders: list[str] = field(default_factory=list)  # further rows, e.g. RankE's online decoder


@dataclass
class RealReference:
    """What every evaluation of a report shares: its first prompts with their real images, and
    the metrics of a second real image of every prompt (`Evaluator.real_reference`: where real
    images stand, and FD / KID of two real sets of the evaluation's size, its noise floor)."""

    prompts: list[str]
    images: np.ndarray  # uint8 [k, H, W, 3], the real image of each of `prompts`
    metrics: dict

    @classmethod
    def from_evaluator(cls, evaluator, count: int = 32) -> RealReference:
        images = evaluator.real_images[:count].permute(0, 2, 3, 1).numpy()
        return cls(evaluator.prompts[:count], images, evaluator.real_reference())

    def save(self, out: Path) -> None:
        """`real_reference.json` and `real_samples.png` in `out`."""
        record = {"prompts": self.prompts, "metrics": self.metrics}
        (Path(out) / "real_reference.json").write_text(json.dumps(record, indent=2))
        save_image_grid(torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255.0,
                        Path(out) / "real_samples.png", nrow=PREVIEW_NROW)  # fmt: skip

    @classmethod
    def load(cls, out: Path) -> RealReference:
        record = json.loads((Path(out) / "real_reference.json").read_text())
        grid = np.asarray(Image.open(Path(out) / "real_samples.png").convert("RGB"))
        return cls(record["prompts"], grid_tiles(grid, len(record["prompts"]), PREVIEW_NROW), record["metrics"])


def read_eval(run: Path) -> list[dict]:
    path = Path(run) / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def trajectory(run: Path, decoder: str) -> list[dict]:
    """The evaluation records of one run for one decoder, by step."""
    return sorted((row for row in read_eval(run) if row["decoder"] == decoder), key=lambda row: row["step"])


def run_seed(run: Path) -> int:
    """The training seed of a run (its config.yaml): what pairs runs of two methods."""
    return int(yaml.safe_load((Path(run) / "config.yaml").read_text())["seed"])


def finals_by_seed(method: Method, decoder: str) -> dict[int, dict]:
    """The last evaluation of every run of `method` with `decoder`, by training seed (runs
    without one are skipped)."""
    finals = {}
    for run in method.runs:
        rows = trajectory(run, decoder)
        if rows:
            finals[run_seed(run)] = rows[-1]
    return finals


def final_metrics(method: Method, decoder: str) -> list[dict]:
    """The last evaluation of every run of `method` with `decoder`, in seed order."""
    finals = finals_by_seed(method, decoder)
    return [finals[seed] for seed in sorted(finals)]


def values_of(rows: list[dict], key: str) -> list[float] | None:
    """Metric `key` of every row; None when a row lacks it (a run evaluated before the metric existed)."""
    return [row[key] for row in rows] if all(key in row for row in rows) else None


def _value_cell(row: dict, key: str, fmt: str) -> str:
    """Metric `key` of one record formatted, or "n/a" where the record lacks it (evaluated before
    the metric existed)."""
    return fmt.format(row[key]) if key in row else "n/a"


def _signed(fmt: str, value: float) -> str:
    return ("+" if value >= 0 else "") + fmt.format(value)


def interval_cell(interval: Interval, fmt: str) -> str:
    """"mean ± half-width" of a 95% interval; the mean alone for one seed."""
    if not interval.defined:
        return fmt.format(interval.mean)
    return f"{fmt.format(interval.mean)} ± {fmt.format(interval.half_width())}"


def difference_cell(interval: Interval, fmt: str) -> str:
    """A signed difference with its interval: "+0.42 [-0.10, +0.94]"; "+0.42" for one seed."""
    text = _signed(fmt, interval.mean)
    if interval.defined:
        text += f" [{_signed(fmt, interval.low)}, {_signed(fmt, interval.high)}]"
    return text


def results_table(sft: dict, methods: list[Method], real: dict | None = None) -> str:
    """Markdown table: method x decoder x metrics (mean ± half-width of the 95% interval over
    seeds), SFT first; with `real`, a row for a second real image of every prompt."""
    header = "| method | decoder | steps | seeds | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    lines = [header, "|---" * (4 + len(COLUMNS)) + "|"]
    if real is not None:
        lines.append("| real images | - | - | - | " + " | ".join(_value_cell(real, key, fmt) for key, _, fmt, _ in COLUMNS) + " |")
    lines.append("| SFT (start) | base | 0 | - | " + " | ".join(_value_cell(sft, key, fmt) for key, _, fmt, _ in COLUMNS) + " |")
    for method in methods:
        for decoder in [method.decoder, *method.extra_decoders]:
            finals = final_metrics(method, decoder)
            if not finals:
                continue
            values = " | ".join(_table_cell(values_of(finals, key), fmt) for key, _, fmt, _ in COLUMNS)
            lines.append(f"| {method.name} | {decoder} | {finals[0]['step']} | {len(finals)} | {values} |")
    return "\n".join(lines) + "\n"


def _table_cell(values: list[float] | None, fmt: str) -> str:
    return "n/a" if values is None else interval_cell(mean_interval(values), fmt)


def metric_by_seed(method: Method, key: str) -> dict[int, float]:
    """A method's final value of metric `key` by training seed (its table row's decoder; seeds
    whose run lacks the metric are left out)."""
    return {seed: row[key] for seed, row in finals_by_seed(method, method.decoder).items() if key in row}


def paired_comparison(a: Method, b: Method) -> dict[str, Interval]:
    """Per metric, the interval of the paired difference A - B over the seeds both have (metrics
    without a common seed are left out)."""
    by_seed = {key: (metric_by_seed(a, key), metric_by_seed(b, key)) for key, *_ in COLUMNS}
    return {key: paired_interval(*pair) for key, pair in by_seed.items() if set(pair[0]) & set(pair[1])}


def gains_over_start(sft: dict, method: Method) -> dict[str, Interval]:
    """Per metric, the interval of a method's final gain over the SFT start (metrics some run lacks are left out)."""
    finals = final_metrics(method, method.decoder)
    return {key: gain_interval(values_of(finals, key), sft[key]) for key, *_ in COLUMNS if finals and values_of(finals, key)}


def comparison_table(a: Method, b: Method) -> str:
    """Markdown table of the paired difference A - B per metric: means, the mean difference
    over common seeds, its 95% interval and the verdict the interval allows."""
    lines = [f"| metric | {a.name} | {b.name} | {a.name} - {b.name} [95% interval] | seeds | verdict |", "|---" * 6 + "|"]
    differences = paired_comparison(a, b)
    for key, title, fmt, better in COLUMNS:
        if key not in differences:
            continue
        a_values, b_values, difference = metric_by_seed(a, key), metric_by_seed(b, key), differences[key]
        lines.append(
            f"| {title} | {fmt.format(np.mean(list(a_values.values())))} | {fmt.format(np.mean(list(b_values.values())))} "
            f"| {difference_cell(difference, fmt)} | {difference.n} | {verdict(difference, better, a.name, SHORT[key])} |"
        )
    return "\n".join(lines) + "\n"


def gain_table(sft: dict, methods: list[Method]) -> str:
    """Markdown table of each method's gain over the SFT start per metric, with its 95% interval."""
    lines = ["| method | seeds | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |", "|---" * (2 + len(COLUMNS)) + "|"]
    for method in methods:
        gains = gains_over_start(sft, method)
        if gains:
            cells = [difference_cell(gains[key], fmt) if key in gains else "n/a" for key, _, fmt, _ in COLUMNS]
            seeds = len(final_metrics(method, method.decoder))
            lines.append(f"| {method.name} ({method.decoder}) | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons(methods: list[Method]) -> list[tuple[Method, Method]]:
    """The pairs of `COMPARISONS` whose two methods are both in `methods`."""
    by_name = {method.name: method for method in methods}
    return [(by_name[a], by_name[b]) for a, b in COMPARISONS if a in by_name and b in by_name]


def per_run_table(methods: list[Method]) -> str:
    """Markdown table of every run's last evaluation (one row per method, seed and decoder); KID
    with its standard error over subsets."""
    lines = ["| run | seed | decoder | step | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"]
    lines.append("|---" * (4 + len(COLUMNS)) + "|")
    for method in methods:
        for run in method.runs:
            for decoder in [method.decoder, *method.extra_decoders]:
                rows = trajectory(run, decoder)
                if rows:
                    last = rows[-1]
                    values = [_value_cell(last, key, fmt) for key, _, fmt, _ in COLUMNS]
                    if last.get("kid_se") is not None:
                        kid = [key for key, *_ in COLUMNS].index("kid")
                        values[kid] += f" ± {COLUMNS[kid][2].format(last['kid_se'])}"
                    lines.append(f"| {run.name} | {run_seed(run)} | {decoder} | {last['step']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _curve(method: Method, key: str, sft: dict) -> tuple[list[int], list[Interval]]:
    """Steps and, per step, the mean over seeds with its 95% interval (SFT at step 0, the common start)."""
    by_step: dict[int, list[float]] = {0: [sft[key]]}
    for run in method.runs:
        for row in trajectory(run, method.decoder):
            if key in row:
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(by_step)
    return steps, [mean_interval(by_step[step]) for step in steps]


def _seed_count(methods: list[Method]) -> int:
    return max((len(final_metrics(m, m.decoder)) for m in methods), default=0)


def _label(method: Method) -> str:
    return f"{method.name} ({method.decoder} decoder)"


def _style() -> None:
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
                         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.linewidth": 1.0})  # fmt: skip


def _seeds_text(methods: list[Method]) -> str:
    seeds = _seed_count(methods)
    return "one seed per method" if seeds < 2 else f"{seeds} seeds per method"


def _legend_below(axis, entries: int) -> None:
    """The legend under the axes, so it never covers a curve."""
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(entries, 2), frameon=False)


def plot_metric(sft: dict, methods: list[Method], key: str, path: Path, real: dict | None = None) -> bool:
    """One metric against post-training steps, a line per method (mean over seeds; shaded: its 95%
    interval where a step has 2+ seeds), the SFT start (dashed) and, with `real`, real images
    (dotted) as reference lines. Returns whether a band was drawn (see `curves_caption`)."""
    _style()
    title, better = next((t, b) for k, t, _, b in COLUMNS if k == key)
    fig, axis = plt.subplots(figsize=(4.4, 3.7))  # small in inches, high dpi: text stays legible on a phone
    banded = False
    for method in methods:
        steps, intervals = _curve(method, key, sft)
        (line,) = axis.plot(steps, [i.mean for i in intervals], marker="o", markersize=4, linewidth=1.8, label=_label(method))
        with_band = [(s, i) for s, i in zip(steps, intervals) if i.defined]
        if with_band:  # from the shared start, where every seed has the same value
            with_band.insert(0, (0, Interval(sft[key], sft[key], sft[key], len(method.runs))))
            banded = True
            axis.fill_between([s for s, _ in with_band], [i.low for _, i in with_band], [i.high for _, i in with_band],
                              color=line.get_color(), alpha=0.18, linewidth=0)  # fmt: skip
    axis.axhline(sft[key], color="0.35", linestyle="--", linewidth=1.2, label="SFT start")
    if real is not None and key in real:
        axis.axhline(real[key], color="tab:green", linestyle=":", linewidth=1.6, label="real images")
    axis.set_xlabel("post-training step")
    axis.set_ylabel(SHORT[key] if better is None else f"{SHORT[key]} ({better} is better)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    _legend_below(axis, len(methods) + 1 + (real is not None and key in real))
    fig.tight_layout()
    fig.savefig(path, dpi=190, bbox_inches="tight")  # a long legend label stays inside the image
    plt.close(fig)
    return banded


def curves_caption(methods: list[Method], banded: bool, real: bool) -> str:
    """What the `plot_metric` figures draw, exactly."""
    caption = (f"Each metric on the held-out prompts against post-training steps (step 0: the SFT start every run "
               f"shares), {_seeds_text(methods)}. Lines: ")  # fmt: skip
    caption += "the mean over seeds; shaded: its 95% interval (Student t over seeds)" if banded else "each run (one seed: no band)"
    caption += "; dashed: the SFT start"
    if real:
        caption += ("; dotted: a second real image of every prompt scored the same way (where real images stand; "
                    "for FD, KID and token KL the evaluation's own noise floor)")  # fmt: skip
    return caption + "."


def plot_pareto(sft: dict, methods: list[Method], path: Path) -> str:
    """Reward (x) against FD (y, lower is better) along each method's mean trajectory, every point
    labelled with its step; returns the caption."""
    _style()
    fig, axis = plt.subplots(figsize=(4.4, 4.3))
    axis.scatter([sft["reward"]], [sft["fd"]], marker="*", s=220, color="black", zorder=4, label="SFT start (step 0)")
    xs, ys = [sft["reward"]], [sft["fd"]]
    for index, method in enumerate(methods):
        steps, rewards = _curve(method, "reward", sft)
        _, fds = _curve(method, "fd", sft)
        x, y = [i.mean for i in rewards], [i.mean for i in fds]
        (line,) = axis.plot(x, y, marker="o", markersize=4, linewidth=1.6, label=_label(method), zorder=3)
        axis.scatter([x[-1]], [y[-1]], marker="s", s=70, color=line.get_color(), edgecolor="black", zorder=5)
        labelled = sorted({round(i) for i in np.linspace(1, len(steps) - 1, min(len(steps) - 1, PARETO_LABELS))})
        for step, px, py in (p for i, p in enumerate(zip(steps, x, y)) if i in labelled):
            axis.annotate(str(step), (px, py), xytext=(5, 5 if index % 2 == 0 else -12), textcoords="offset points",
                          fontsize=9, color=line.get_color())  # fmt: skip
        xs += x
        ys += y
    # room for the step labels inside the frame
    x_pad, y_pad = 0.12 * (max(xs) - min(xs) or 1.0), 0.12 * (max(ys) - min(ys) or 1.0)
    axis.set_xlim(min(xs) - x_pad, max(xs) + x_pad)
    axis.set_ylim(min(ys) - y_pad, max(ys) + y_pad)
    axis.set_xlabel("reward (toy CLIP, higher is better)")
    axis.set_ylabel("FD (toy features, lower is better)")
    axis.set_title("alignment vs fidelity along training")
    axis.grid(alpha=0.3)
    _legend_below(axis, len(methods) + 1)
    fig.tight_layout()
    fig.savefig(path, dpi=180, bbox_inches="tight")  # a long legend label stays inside the image
    plt.close(fig)
    points = "each point one evaluation of the run" if _seed_count(methods) < 2 else "each point the mean over seeds at one evaluation"
    return (f"Reward against FD along each method's trajectory ({_seeds_text(methods)}, {points}; numbers: the "
            f"evaluation step, up to {PARETO_LABELS} per line; square: the last evaluation; star: the SFT start). "
            "Down and to the right is better on both.")  # fmt: skip


def plot_decoder_mechanism(frozen: Method, adapted: Method, reconstruction: dict, base: dict, path: Path) -> str:
    """The mechanism in one figure: left, the FD of each seed's final policy with the frozen
    decoder and with a decoder adapted to its rollouts (the same tokens, paired by seed); right,
    how the base and each trained EMA decoder render the ground-truth codes of the held-out real
    images (`reconstruction`: run name -> {"method", "recon_fd"}; `base`: the base decoder's
    `recon_fd`). Returns the caption."""
    _style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.6))
    frozen_fd, adapted_fd = metric_by_seed(frozen, "fd"), metric_by_seed(adapted, "fd")
    seeds = sorted(set(frozen_fd) & set(adapted_fd))
    for seed in seeds:
        left.plot([0, 1], [frozen_fd[seed], adapted_fd[seed]], marker="o", color="tab:blue", alpha=0.8)
        left.annotate(f"seed {seed}", (1.04, adapted_fd[seed]), fontsize=7, va="center")
    left.set_xticks([0, 1], [f"frozen ({frozen.decoder})", "adapted (ema)"])
    left.set_xlim(-0.3, 1.45)
    left.set_ylabel("FD of the samples (lower is better)")
    left.set_title(f"{frozen.name} policy's tokens, two decoders", fontsize=10)
    names = sorted({row["method"] for row in reconstruction.values()})
    right.axhline(base["recon_fd"], color="0.35", linestyle="--", linewidth=1.2)  # the base decoder (caption)
    for index, name in enumerate(names):
        values = [row["recon_fd"] for row in reconstruction.values() if row["method"] == name]
        right.scatter([index] * len(values), values, s=22)
    right.set_xticks(range(len(names)), [textwrap.fill(name, 14) for name in names], fontsize=7)
    right.set_ylabel("FD of ground-truth codes decoded")
    right.set_title("reconstruction of real images' codes", fontsize=10)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=180)
    plt.close(fig)
    return (f"Left: FD of the final {frozen.name} policy's samples decoded by the frozen decoder and by a decoder "
            f"trained on that policy's rollouts (the decoder stage alone), one line per seed. Right: FD to the "
            "real images of their own ground-truth codes decoded by the base decoder (dashed) and by each run's EMA "
            "decoder (a dot per run): whether the anchors keep the decoder a good decoder of real codes.")  # fmt: skip


def _final_preview(method: Method) -> tuple[np.ndarray, list[bool]] | None:
    """The seed-0 run's (else the first run's) last evaluation images and verifier verdicts."""
    runs = sorted(method.runs, key=lambda run: (run_seed(run) != 0, run_seed(run)))
    for run in runs:
        rows = trajectory(run, method.decoder)
        grid_path = Path(run) / f"eval_samples_{rows[-1]['step']:06d}_{method.decoder}.png" if rows else None
        if grid_path is not None and grid_path.is_file() and "preview_correct" in rows[-1]:
            correct = rows[-1]["preview_correct"]
            grid = np.asarray(Image.open(grid_path).convert("RGB"))
            return grid_tiles(grid, len(correct), PREVIEW_NROW), correct
    return None


def plot_samples(
    out: Path, sft: dict, methods: list[Method], reference: RealReference, figures: int = 2
) -> tuple[str, list[tuple[str, str]]]:
    """Per prompt (a row): its real image, the SFT sample and each sample method's final one
    (seed-0 runs), each marked with the toy verifier's verdict. The prompts are shared out over
    `figures` files `samples_<i>.png` in `out` (side by side on a wide screen, stacked on a
    phone). Returns the caption and, per file, (its label, its name)."""
    from ranke.toy.verifier import score_image

    grid = np.asarray(Image.open(Path(out) / "sft_samples.png").convert("RGB"))
    real_correct = [bool(score_image(image, prompt).correct) for image, prompt in zip(reference.images, reference.prompts)]
    columns = [("real", reference.images, real_correct)]
    columns.append(("SFT", grid_tiles(grid, len(sft["preview_correct"]), PREVIEW_NROW), sft["preview_correct"]))
    shown = [m for m in methods if m.name in SAMPLE_METHODS] or methods
    for method in shown:
        preview = _final_preview(method)
        if preview is not None:
            columns.append((method.name, *preview))
    rows = min(SAMPLE_PROMPTS, len(reference.prompts), *(len(images) for _, images, _ in columns))
    per_figure = -(-rows // figures)
    files = []
    for index, first in enumerate(range(0, rows, per_figure), start=1):
        shown_rows = range(first, min(first + per_figure, rows))
        _sample_figure(columns, reference.prompts, shown_rows, Path(out) / f"samples_{index}.png")
        files.append((f"prompts {shown_rows[0] + 1}-{shown_rows[-1] + 1}", f"samples_{index}.png"))
    names = ", ".join(name for name, _, _ in columns[2:])
    caption = (f"The first {rows} held-out prompts, one per row: the real image of its scene, the SFT sample and the "
            f"final {names} samples (seed-0 runs, the same sampling seed). Frame and mark: the toy verifier's "
            "verdict on that image (green ✓ correct, red ✗ wrong).")  # fmt: skip
    return caption, files


def _sample_figure(columns, prompts: list[str], rows: range, path: Path) -> None:
    _style()
    fig = plt.figure(figsize=(1.15 * len(columns) + 0.25, 2.15 * len(rows)))  # room for 3 lines of prompt
    for row, panel in zip(rows, np.atleast_1d(fig.subfigures(len(rows), 1))):
        prompt = textwrap.wrap(f"{row + 1}. {prompts[row]}", 9 * len(columns))
        panel.suptitle("\n".join(prompt), fontsize=12, x=0.02, ha="left", y=0.98, va="top", linespacing=1.1)
        for axis, (name, images, correct) in zip(np.atleast_1d(panel.subplots(1, len(columns))), columns):
            axis.imshow(images[row], interpolation="nearest")
            colour = "#1a7f37" if correct[row] else "#cf222e"
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_xlabel(f"{name} {'✓' if correct[row] else '✗'}", color=colour, fontsize=12, labelpad=2)
        panel.subplots_adjust(left=0.03, right=0.97, top=0.63, bottom=0.14, wspace=0.12)
    fig.savefig(path, dpi=180)
    plt.close(fig)


@dataclass
class Report:
    title: str
    intro: str
    sections: list[tuple[str, str]]  # (heading, markdown body); images as ![caption](file.png), one per line


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """`report.md` and its self-contained HTML twin in `out`."""
    markdown = [f"# {report.title}", "", report.intro, ""]
    for heading, body in report.sections:
        markdown += [f"## {heading}", "", body, ""]
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(markdown))
    html_path.write_text(_html(report, out))
    return md_path, html_path


def _text(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def _image_lines(lines: list[str], i: int) -> tuple[list[tuple[str, str]], int]:
    images = []
    while i < len(lines) and lines[i].startswith("![") and "](" in lines[i]:
        caption, src = lines[i][2:].rsplit("](", 1)
        images.append((caption, src.rstrip(")")))
        i += 1
    return images, i


def _inline(text: str, out: Path) -> str:
    """Minimal markdown-to-HTML for what reports use: paragraphs, tables, images, code, lists."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not set(lines[i].replace("|", "").strip()) <= {"-", ":"}:
                    rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head = "".join(f"<th>{_text(c)}</th>" for c in rows[0])
            body = "".join(
                "<tr>" + "".join(f'<td data-label="{html.escape(h)}">{_text(c)}</td>' for h, c in zip(rows[0], row)) + "</tr>"
                for row in rows[1:]
            )
            blocks.append(f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
            continue
        if line.startswith("![") and "](" in line:
            images, i = _image_lines(lines, i)
            figures = []
            for caption, src in images:
                data = base64.b64encode((out / src).read_bytes()).decode()
                figures.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{_text(caption)}</figcaption></figure>")  # fmt: skip
            css = "figures" if len(figures) > 1 else "figures single"
            blocks.append(f'<div class="{css}">' + "".join(figures) + "</div>")
            continue
        if line.startswith("```"):
            code = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                code.append(html.escape(lines[i]))
                i += 1
            blocks.append("<pre>" + "\n".join(code) + "</pre>")
        elif line.startswith("* "):
            items = []
            while i < len(lines) and lines[i].startswith("* "):
                items.append(f"<li>{_text(lines[i][2:])}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            blocks.append(f"<p>{_text(line)}</p>")
        i += 1
    return "\n".join(blocks)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:16px;line-height:1.5;max-width:1100px;
margin:1.5em auto;padding:0 1em;color:#1f2328}
h1{font-size:1.6em;line-height:1.25}h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #d0d7de}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;background:#f2f4f6;padding:0 .25em;border-radius:3px}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.table{overflow-x:auto;margin:1em 0}
table{border-collapse:collapse;font-size:.9em;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:1.2em;margin:1em 0}
.figures.single{grid-template-columns:minmax(0,760px)}
figure{margin:0}img{max-width:100%;height:auto;display:block}
figcaption{font-size:.88em;color:#57606a;margin-top:.3em}
@media (max-width:700px){
body{margin:.8em auto;padding:0 .7em}
table,thead,tbody,tr,td{display:block}thead{display:none}
tr{border:1px solid #d0d7de;border-radius:6px;margin:0 0 .8em;padding:.3em .5em}
td{display:flex;justify-content:space-between;gap:.8em;border:none;border-bottom:1px solid #eef0f2;padding:3px 0;text-align:right}
td:last-child{border-bottom:none}
td::before{content:attr(data-label);flex:0 0 50%;text-align:left;font-weight:600;color:#57606a}
td:first-child{font-weight:600}
}
"""


def _html(report: Report, out: Path) -> str:
    parts = [f"<h1>{_text(report.title)}</h1>", _inline(report.intro, out)]
    for heading, body in report.sections:
        parts += [f"<h2>{_text(heading)}</h2>", _inline(body, out)]
    head = ('<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(report.title)}</title><style>{STYLE}</style>")  # fmt: skip
    return f"<!doctype html><html lang=\"en\"><head>{head}</head><body>{''.join(parts)}</body></html>"
