"""`ranke demo --quick` end to end: the report, its table, plots and sample grids."""

from __future__ import annotations

import json
import re

from ranke.cli import main
from ranke.demo import describe
from ranke.eval.report import Method, read_eval


def test_quick_demo_writes_a_report_with_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    assert "report.md" in capsys.readouterr().out

    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| (SFT|GRPO|RankE)", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["SFT (start)", "GRPO", "RankE", "RankE"]
    for row in rows:
        numbers = [cell.strip() for cell in row.strip("|").split("|")[4:]]
        assert len(numbers) == 5 and all(re.fullmatch(r"-?\d+\.\d+", n) for n in numbers), row

    for image in ("curves.png", "pareto.png", "samples_side_by_side.png", "sft_samples.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,iVBOR") == 3  # the three figures, inlined

    sft = json.loads((out / "sft_metrics.json").read_text())
    grpo = read_eval(out / "runs" / "grpo_seed0")
    assert [row["step"] for row in grpo] == [4, 8] and all(row["decoder"] == "base" for row in grpo)
    ranke = read_eval(out / "runs" / "ranke_seed0")
    assert sorted({row["decoder"] for row in ranke}) == ["ema", "online"]
    assert f"{sft['fd']:.1f}" in rows[0]

    # a second call reuses the finished runs instead of appending to them
    main(["demo", "--quick", "--out", str(out)])
    assert [row["step"] for row in read_eval(out / "runs" / "grpo_seed0")] == [4, 8]


def test_describe_calls_changes_by_direction_and_equal_figures_unchanged(tmp_path):
    sft = {"reward": 89.05, "clip_score": 89.26, "fd": 38.2, "verifier_accuracy": 0.487, "token_kl": 0.032}
    final = {"step": 100, "decoder": "ema", "reward": 89.41, "clip_score": 89.11, "fd": 46.0,
             "verifier_accuracy": 0.4871, "token_kl": 0.103}  # fmt: skip
    (tmp_path / "eval.jsonl").write_text(json.dumps(final) + "\n")
    text = describe(sft, [Method("RankE", "ema", [tmp_path])])
    assert text == (
        "* RankE (ema decoder, 1 seed(s)): reward (toy CLIP, train) 89.05 -> 89.41 (better); "
        "CLIP score (eval toy CLIP) 89.26 -> 89.11 (worse); FD (toy features) 38.2 -> 46.0 (worse); "
        "verifier accuracy 0.487 -> 0.487 (unchanged); token KL (nats) 0.032 -> 0.103 (worse)."
    )
