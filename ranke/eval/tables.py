"""The report's tables, in Markdown: results with 95% intervals over seeds, the paired difference
of two methods, each method's gain over the SFT start and every run's last evaluation; and the
cells and intervals they show (also the sentences of `ranke.demo.describe`)."""

from __future__ import annotations

import numpy as np

from ranke.eval.frontier import common_gain, decoder_gain_parts, matched_gain_difference
from ranke.eval.runs import final_metrics, frontier_by_seed, metric_by_seed, run_seed, trajectory, values_of
from ranke.eval.stats import Interval, gain_interval, mean_interval, paired_interval, verdict
from ranke.eval.study import Method

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
        for decoder in method.spec.decoders:
            finals = final_metrics(method, decoder)
            if not finals:
                continue
            values = " | ".join(_table_cell(values_of(finals, key), fmt) for key, _, fmt, _ in COLUMNS)
            lines.append(f"| {method.name} | {decoder} | {finals[0]['step']} | {len(finals)} | {values} |")
    return "\n".join(lines) + "\n"


def _table_cell(values: list[float] | None, fmt: str) -> str:
    return "n/a" if values is None else interval_cell(mean_interval(values), fmt)


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


def per_run_table(methods: list[Method]) -> str:
    """Markdown table of every run's last evaluation (one row per method, seed and decoder); KID
    with its standard error over subsets."""
    lines = ["| run | seed | decoder | step | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"]
    lines.append("|---" * (4 + len(COLUMNS)) + "|")
    for method in methods:
        for run in method.runs:
            for decoder in method.spec.decoders:
                rows = trajectory(run, decoder)
                if rows:
                    last = rows[-1]
                    values = [_value_cell(last, key, fmt) for key, _, fmt, _ in COLUMNS]
                    if last.get("kid_se") is not None:
                        kid = [key for key, *_ in COLUMNS].index("kid")
                        values[kid] += f" ± {COLUMNS[kid][2].format(last['kid_se'])}"
                    lines.append(f"| {run.name} | {run_seed(run)} | {decoder} | {last['step']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


FRONTIER_METRICS = ("fd", "kid", "precision", "recall")  # fidelity read at matched reward gain


def frontier_table(sft: dict, compared: list[tuple[Method, Method]]) -> str:
    """Markdown table of each comparison A - B at matched reward gain (`ranke.eval.frontier`): the
    largest reward gain over the SFT start that every run of both reaches, and per fidelity metric
    the paired difference where each run first reaches it, with its 95% interval and verdict."""
    lines = ["| comparison | reward gain | metric | A - B [95% interval] | seeds | verdict |", "|---" * 6 + "|"]
    for a, b in compared:
        for key in FRONTIER_METRICS:
            a_runs, b_runs = frontier_by_seed(a, sft, key), frontier_by_seed(b, sft, key)
            if not (a_runs and b_runs):
                continue
            gain = common_gain(a_runs, b_runs)
            difference = matched_gain_difference(a_runs, b_runs, gain)
            fmt, better = next((fmt, better) for k, _, fmt, better in COLUMNS if k == key)
            lines.append(
                f"| {a.name} - {b.name} | {gain:+.2f} | {SHORT[key]} | {difference_cell(difference, fmt)} | "
                f"{difference.n} | {verdict(difference, better, a.name, SHORT[key])} |"
            )
    return "\n".join(lines) + "\n"


def decoder_gain_table(frozen: Method, adapted: Method, base_real_codes_fd: float, real_codes_fd: dict[str, float]) -> str:
    """Markdown table of an adapted decoder's FD gain over the frozen one on the same policy's tokens,
    split into the part it also gives on the real images' ground-truth codes and the part specific
    to the policy's tokens (`decoder_gain_parts`); `real_codes_fd`: run name -> the adapted run's
    real-code FD, `base_real_codes_fd`: the base decoder's."""
    adapted_real = {run_seed(run): real_codes_fd[run.name] for run in adapted.runs if run.name in real_codes_fd}
    parts = decoder_gain_parts(metric_by_seed(frozen, "fd"), metric_by_seed(adapted, "fd"), base_real_codes_fd, adapted_real)
    lines = ["| FD gain of the adapted decoder (positive: better) | mean [95% interval] | seeds |", "|---|---|---|"]
    for name, interval in (("on the policy's tokens (frozen - adapted)", parts.on_policy_tokens),
                           ("on the real images' codes (base - adapted)", parts.on_real_codes),
                           ("specific to the policy's tokens (the first - the second)", parts.specific_to_policy)):  # fmt: skip
        lines.append(f"| {name} | {difference_cell(interval, '{:.1f}')} | {interval.n} |")
    return "\n".join(lines) + "\n"
