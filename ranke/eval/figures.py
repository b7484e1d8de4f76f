"""The report's figures (matplotlib, PNG): each metric against post-training steps, reward against
FD along each method's trajectory, the decoder mechanism and a captioned sample grid; each plot
returns or has its caption."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ranke.eval.runs import (  # noqa: E402
    PREVIEW_NROW,
    RealReference,
    final_metrics,
    frontier_by_seed,
    metric_by_seed,
    run_seed,
    trajectory,
)
from ranke.eval.stats import Interval, mean_interval  # noqa: E402
from ranke.eval.study import Method  # noqa: E402
from ranke.eval.tables import COLUMNS, SHORT  # noqa: E402
from ranke.images import grid_tiles  # noqa: E402

SAMPLE_PROMPTS = 8
STEP_LABELS = 6  # step labels per mean trajectory at most (evenly spread, the last one included)


def _curve(method: Method, key: str, sft: dict) -> tuple[list[int], list[Interval]]:
    """Steps and, per step, the mean over seeds with its 95% interval (SFT at step 0, the common start)."""
    by_step: dict[int, list[float]] = {0: [sft[key]]}
    for run in method.runs:
        for row in trajectory(run, method.decoder):
            if key in row:
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(by_step)
    return steps, [mean_interval(by_step[step]) for step in steps]


def seed_counts(methods: list[Method]) -> tuple[int, int]:
    """The fewest and the most seeds any of `methods` has finished (a study's mechanism runs may
    have fewer seeds than the methods they continue)."""
    counts = [len(final_metrics(method, method.decoder)) for method in methods] or [0]
    return min(counts), max(counts)


def _label(method: Method) -> str:
    return f"{method.name} ({method.decoder} decoder)"


def _style() -> None:
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
                         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.linewidth": 1.0})  # fmt: skip


def seeds_text(fewest: int, most: int) -> str:
    """`seed_counts` in words: "one seed per method", "5 seeds per method" or "3 to 5 seeds per method"."""
    if most < 2:
        return "one seed per method"
    return f"{most} seeds per method" if fewest == most else f"{fewest} to {most} seeds per method"


def _legend_below(axis, entries: int) -> None:
    """The legend under the axes, so it never covers a curve: in two columns where they fit the
    figure's width, else in one (a wider legend would widen the saved image and shrink the plot).
    Called after `tight_layout`, so the axes keep their size and the saved image (`bbox_inches="tight"`)
    grows to hold it."""
    place = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "frameon": False}
    legend = axis.legend(ncol=min(entries, 2), **place)
    figure = axis.figure
    if legend.get_window_extent(figure.canvas.get_renderer()).width > figure.bbox.width:
        legend.remove()
        axis.legend(ncol=1, **place)


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
    fig.tight_layout()
    _legend_below(axis, len(methods) + 1 + (real is not None and key in real))
    fig.savefig(path, dpi=190, bbox_inches="tight")  # a long legend label stays inside the image
    plt.close(fig)
    return banded


def curves_caption(methods: list[Method], banded: bool, real: bool) -> str:
    """What the `plot_metric` figures draw, exactly."""
    caption = (f"Each metric on the held-out prompts against post-training steps (step 0: the SFT start every run "
               f"shares), {seeds_text(*seed_counts(methods))}. Lines: ")  # fmt: skip
    caption += "the mean over seeds; shaded: its 95% interval (Student t over seeds)" if banded else "each run (one seed: no band)"
    caption += "; dashed: the SFT start"
    if real:
        caption += ("; dotted: a second real image of every prompt scored the same way (where real images stand; "
                    "for FD, KID and token KL the evaluation's own noise floor)")  # fmt: skip
    return caption + "."


def plot_frontier(sft: dict, methods: list[Method], path: Path, real: dict | None = None, key: str = "fd") -> str:
    """The reward-fidelity plane the frontier study reads (`ranke.eval.frontier`): reward gain over
    the SFT start (x) against metric `key` (y) along every run (thin) and each method's mean over
    seeds (thick), from the shared start (star), with the real-image floor; returns the caption."""
    _style()
    fig, axis = plt.subplots(figsize=(5.2, 4.4))
    axis.scatter([0.0], [sft[key]], marker="*", s=220, color="black", zorder=5, label="SFT start")
    for method in methods:
        runs = frontier_by_seed(method, sft, key)
        (mean_line,) = axis.plot([], [], linewidth=2.2, marker="o", markersize=4, label=_label(method), zorder=4)
        for points in runs.values():
            axis.plot([p.gain for p in points], [p.value for p in points], color=mean_line.get_color(), alpha=0.35, linewidth=1)
        steps, rewards = _curve(method, "reward", sft)
        _, values = _curve(method, key, sft)
        x, y = [r.mean - sft["reward"] for r in rewards], [v.mean for v in values]
        mean_line.set_data(x, y)
        labelled = sorted({round(i) for i in np.linspace(1, len(steps) - 1, min(len(steps) - 1, STEP_LABELS))})
        for step, px, py in (point for i, point in enumerate(zip(steps, x, y)) if i in labelled):
            axis.annotate(str(step), (px, py), xytext=(4, 4), textcoords="offset points", fontsize=8, color=mean_line.get_color())
    if real is not None and key in real:
        axis.axhline(real[key], color="grey", linestyle=":", linewidth=1.5, label="real images (the evaluation's floor)")
    axis.relim()
    axis.autoscale_view()
    axis.set_xlabel("reward gain over the SFT start (training toy CLIP)")
    axis.set_ylabel(f"{SHORT[key]} (toy features, lower is better)")
    axis.set_title("reward against fidelity along training")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    _legend_below(axis, len(methods) + 2)
    fig.savefig(path, dpi=180, bbox_inches="tight")
    plt.close(fig)
    counts = seed_counts(methods)
    can = ("With one seed this shows where one run went, not whether the methods differ: that needs paired seeds."
           if counts[1] < 2 else "The frontier table compares the methods at matched reward gain, paired by seed.")  # fmt: skip
    return (f"Reward gain against {SHORT[key]} from the SFT start (star) along each run ({seeds_text(*counts)}; thin: "
            f"each seed, thick: the mean at each evaluation, numbered by step; dotted: a second set of real images, the "
            f"floor). Right "
            f"is more reward, down is better fidelity: a method whose line lies lower at the same gain pays less "
            f"fidelity for its reward. {can}")  # fmt: skip


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
    """Per prompt (a row): its real image, the SFT sample and the final one of each of `methods`
    (seed-0 runs), each marked with the toy verifier's verdict. The prompts are shared out over
    `figures` files `samples_<i>.png` in `out` (side by side on a wide screen, stacked on a
    phone). Returns the caption and, per file, (its label, its name)."""
    from ranke.toy.verifier import score_image

    grid = np.asarray(Image.open(Path(out) / "sft_samples.png").convert("RGB"))
    real_correct = [bool(score_image(image, prompt).correct) for image, prompt in zip(reference.images, reference.prompts)]
    columns = [("real", reference.images, real_correct)]
    columns.append(("SFT", grid_tiles(grid, len(sft["preview_correct"]), PREVIEW_NROW), sft["preview_correct"]))
    for method in methods:
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
