"""The experiment report: a results table shaped like the paper's, curves against steps, a
reward-vs-FD Pareto plot and side-by-side sample grids, as `report.md` and a self-contained
`report.html` (images inlined) that opens in a browser.

Input: the SFT starting point's metrics and, per method, the post-training runs (one per seed)
whose `eval.jsonl` files `ranke posttrain` wrote (`ranke.train.posttrain.evaluate_step`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (metrics key, column title, format, which way is better)
COLUMNS = (
    ("reward", "reward (toy CLIP, train)", "{:.2f}", "higher"),
    ("clip_score", "CLIP score (eval toy CLIP)", "{:.2f}", "higher"),
    ("fd", "FD (toy features)", "{:.1f}", "lower"),
    ("verifier_accuracy", "verifier accuracy", "{:.3f}", "higher"),
    ("token_kl", "token KL (nats)", "{:.3f}", "lower"),
)
CURVES = ("reward", "clip_score", "fd", "token_kl", "verifier_accuracy")


@dataclass
class Method:
    """One row group of the report: a method, the decoder its table row uses, and its runs."""

    name: str  # e.g. "GRPO", "RankE"
    decoder: str  # decoder whose metrics make the row: base (frozen), ema or online
    runs: list[Path]  # one run directory per seed
    note: str = ""
    extra_decoders: list[str] = field(default_factory=list)  # further rows, e.g. RankE's online decoder


def read_eval(run: Path) -> list[dict]:
    path = Path(run) / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def trajectory(run: Path, decoder: str) -> list[dict]:
    """The evaluation records of one run for one decoder, by step."""
    return sorted((row for row in read_eval(run) if row["decoder"] == decoder), key=lambda row: row["step"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cell(values: list[float], fmt: str) -> str:
    mean, std = mean_std(values)
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(values) > 1 else "")


def final_metrics(method: Method, decoder: str) -> list[dict]:
    """The last evaluation of every run of `method` with `decoder` (runs without one are skipped)."""
    finals = [trajectory(run, decoder) for run in method.runs]
    return [rows[-1] for rows in finals if rows]


def results_table(sft: dict, methods: list[Method]) -> str:
    """Markdown table: method x decoder x metrics (mean ± std over seeds), SFT first."""
    header = "| method | decoder | steps | seeds | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    lines = [header, "|---" * (4 + len(COLUMNS)) + "|"]
    lines.append("| SFT (start) | base | 0 | - | " + " | ".join(fmt.format(sft[key]) for key, _, fmt, _ in COLUMNS) + " |")
    for method in methods:
        for decoder in [method.decoder, *method.extra_decoders]:
            finals = final_metrics(method, decoder)
            if not finals:
                continue
            values = " | ".join(cell([row[key] for row in finals], fmt) for key, _, fmt, _ in COLUMNS)
            lines.append(f"| {method.name} | {decoder} | {finals[0]['step']} | {len(finals)} | {values} |")
    arrows = ", ".join(f"{title}: {better} is better" for _, title, _, better in COLUMNS)
    return "\n".join(lines) + f"\n\n{arrows}.\n"


def per_run_table(methods: list[Method]) -> str:
    """Markdown table of every run's last evaluation (one row per method, seed and decoder)."""
    lines = ["| run | decoder | step | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"]
    lines.append("|---" * (3 + len(COLUMNS)) + "|")
    for method in methods:
        for run in method.runs:
            for decoder in [method.decoder, *method.extra_decoders]:
                rows = trajectory(run, decoder)
                if rows:
                    values = " | ".join(fmt.format(rows[-1][key]) for key, _, fmt, _ in COLUMNS)
                    lines.append(f"| {run.name} | {decoder} | {rows[-1]['step']} | {values} |")
    return "\n".join(lines) + "\n"


def _mean_curve(method: Method, decoder: str, key: str, sft: dict) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std over seeds of one metric (SFT at step 0 as the common start)."""
    by_step: dict[int, list[float]] = {0: [sft[key]]}
    for run in method.runs:
        for row in trajectory(run, decoder):
            by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(by_step)
    stats = [mean_std(by_step[step]) for step in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def plot_curves(sft: dict, methods: list[Method], path: Path) -> None:
    """One panel per metric against post-training steps, a line per method (band: ± std over seeds)."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    titles = {key: title for key, title, _, _ in COLUMNS}
    for axis, key in zip(axes, CURVES):
        for method in methods:
            steps, mean, std = _mean_curve(method, method.decoder, key, sft)
            (line,) = axis.plot(steps, mean, marker="o", markersize=3, label=f"{method.name} ({method.decoder} decoder)")
            axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=line.get_color(), alpha=0.15)  # fmt: skip
        axis.set_title(titles[key], fontsize=10)
        axis.set_xlabel("post-training step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(sft: dict, methods: list[Method], path: Path) -> None:
    """Reward (x) against FD (y, lower is better) along each method's training trajectory."""
    fig, axis = plt.subplots(figsize=(5.5, 4.5))
    axis.scatter([sft["reward"]], [sft["fd"]], color="black", zorder=3, label="SFT (start)")
    for method in methods:
        _, rewards, _ = _mean_curve(method, method.decoder, "reward", sft)
        steps, fds, _ = _mean_curve(method, method.decoder, "fd", sft)
        (line,) = axis.plot(rewards, fds, marker="o", markersize=3, label=method.name)
        axis.annotate(f"step {steps[-1]}", (rewards[-1], fds[-1]), fontsize=7, color=line.get_color(),
                      xytext=(4, 4), textcoords="offset points")  # fmt: skip
    axis.set_xlabel("reward (toy CLIP, higher is better)")
    axis.set_ylabel("FD (toy features, lower is better)")
    axis.set_title("alignment vs fidelity")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Report:
    title: str
    intro: str
    sections: list[tuple[str, str]]  # (heading, markdown body); images as ![alt](file.png)


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """`report.md` and its self-contained HTML twin in `out`."""
    markdown = [f"# {report.title}", "", report.intro, ""]
    for heading, body in report.sections:
        markdown += [f"## {heading}", "", body, ""]
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(markdown))
    html_path.write_text(_html(report, out))
    return md_path, html_path


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
                    rows.append([html.escape(c.strip()) for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head = "".join(f"<th>{c}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows[1:])
            blocks.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        if line.startswith("![") and "](" in line:
            alt, src = line[2:].split("](", 1)
            src = src.rstrip(")")
            data = base64.b64encode((out / src).read_bytes()).decode() if (out / src).is_file() else ""
            blocks.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(alt)}</figcaption></figure>")  # fmt: skip
        elif line.startswith("```"):
            code = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                code.append(html.escape(lines[i]))
                i += 1
            blocks.append("<pre>" + "\n".join(code) + "</pre>")
        elif line.startswith("* "):
            items = []
            while i < len(lines) and lines[i].startswith("* "):
                items.append(f"<li>{html.escape(lines[i][2:])}</li>")
                i += 1
            blocks.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            blocks.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(blocks)


def _html(report: Report, out: Path) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;image-rendering:pixelated}"
        "figure{margin:1em 0}figcaption{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:.8em;overflow:auto}"
    )
    parts = [f"<h1>{html.escape(report.title)}</h1>", _inline(report.intro, out)]
    for heading, body in report.sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", _inline(body, out)]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>" \
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"  # fmt: skip
