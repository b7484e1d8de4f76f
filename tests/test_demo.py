"""`ranke demo --quick` end to end: the report, its table, plots and sample grids; `describe` with one seed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ranke import config as config_lib
from ranke.cli import main
from ranke.config import RunConfig
from ranke.demo import ABLATIONS, GRPO, LEVELS, PRESETS, RANKE, method_jobs, at_level, describe, reward_description
from ranke.eval.runs import read_eval
from ranke.eval.study import Method
from ranke.eval.tables import COLUMNS


def test_quick_demo_writes_a_report_with_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "report.md" in printed
    chosen = re.search(r"demo\[quick\]: precision (fp32|bf16) \(auto: ", printed).group(1)
    assert re.search(r"  (grpo|ranke)_seed0: posttrain\[(policy|both)\]: step \d/8, ", printed)  # live progress

    report = (out / "report.md").read_text()
    assert re.search(rf"sampled in \*\*{chosen}\*\* \(auto: [^)]*\)+; chosen on: .*CPU capability", report)
    results = report.split("## Results\n", 1)[1].strip().split("\n\n", 1)[0]  # the first table of the section
    rows = results.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["real images", "SFT (start)", "GRPO", "RankE", "RankE"]
    for row in rows:
        numbers = [cell.strip() for cell in row.strip("|").split("|")[4:]]
        assert len(numbers) == len(COLUMNS) and all(re.fullmatch(r"-?\d+\.\d+", n) for n in numbers), row
    assert "| FD (toy features) |" in report and "one seed: no interval" in report  # the paired comparison
    assert "rollouts against the reward `toy_clip`, with seed 0." in report

    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(figures) == sorted([f"curve_{key}.png" for key, *_ in COLUMNS] + ["frontier.png", "samples_1.png", "samples_2.png"])
    for image in [*figures, "sft_samples.png", "real_samples.png"]:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,iVBOR") == len(figures)  # every figure, inlined

    sft = json.loads((out / "sft_metrics.json").read_text())
    grpo = read_eval(out / "runs" / "grpo_seed0")
    assert [row["step"] for row in grpo] == [4, 8] and all(row["decoder"] == "base" for row in grpo)
    ranke = read_eval(out / "runs" / "ranke_seed0")
    assert sorted({row["decoder"] for row in ranke}) == ["ema", "online"]
    assert f"{sft['fd']:.1f}" in rows[1]

    # a second call reuses the finished runs instead of appending to them
    main(["demo", "--quick", "--out", str(out)])
    assert [row["step"] for row in read_eval(out / "runs" / "grpo_seed0")] == [4, 8]


def test_describe_with_one_seed_gives_figures_and_calls_nothing(tmp_path):
    sft = {"reward": 89.05, "clip_score": 89.26, "fd": 38.2, "kid": 1.25, "verifier_accuracy": 0.487, "token_kl": 0.032}
    final = {"step": 100, "decoder": "ema", "reward": 89.41, "clip_score": 89.11, "fd": 46.0, "kid": 2.5,
             "verifier_accuracy": 0.4871, "token_kl": 0.103}  # fmt: skip
    (tmp_path / "eval.jsonl").write_text(json.dumps(final) + "\n")
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    real = {"n": 300, "fd": 6.1, "kid": 0.021, "kid_se": 0.015}
    lines = describe(sft, [Method(RANKE, [tmp_path])], [], real).splitlines()
    assert lines[0].startswith("The evaluation's own noise: a second real image of each of the same 300 prompts is "
                               "FD 6.1 and KID 0.021 (standard error 0.015) from the first")  # fmt: skip
    assert lines[1] == ""  # its own paragraph
    assert lines[2].startswith("One seed per method:") and "nothing here is called better or worse" in lines[2]
    assert lines[-1] == (
        "* RankE (ema decoder) vs the SFT start, one seed: reward +0.36, CLIP score -0.15, FD +7.8, KID +1.250, "
        "verifier accuracy +0.000, token KL +0.071 (one seed: no interval)."
    )


def test_reward_description_names_each_term_with_its_weight():
    assert reward_description({"toy_clip": 1.0}) == "`toy_clip`"
    assert reward_description({"toy_clip": 1.0, "colorfulness": 0.5}) == "1 x `toy_clip` + 0.5 x `colorfulness`"


def test_mechanism_runs_start_from_grpo_runs_of_the_same_preset():
    """The decoder-only mechanism runs start from the final policy of the GRPO run of their seed
    (at the same level)."""
    for name, preset in PRESETS.items():
        assert set(preset.mechanism_seeds) <= set(preset.seeds), name
        for method in preset.study().methods:
            if method.starts_from is not None:
                assert method.starts_from in preset.study().methods and method.starts_from.group == method.group, name
                assert method.starts_from.overrides == (*LEVELS.get(method.group, ()), "mode=policy"), name
    assert PRESETS["mechanism"].ablation_seeds == () and len(PRESETS["mechanism"].mechanism_seeds) >= 3


def test_each_preset_declares_the_study_it_runs():
    """Every preset's study holds GRPO and RankE and their comparison (at each of its levels); the
    ablations and the mechanism runs, with their comparisons, only where the preset gives them seeds."""
    for name, preset in PRESETS.items():
        study = preset.study()
        for level in preset.levels or ("",):
            leveled = (lambda spec: at_level(spec, level)) if level else (lambda spec: spec)  # noqa: B023
            assert {leveled(spec) for spec in preset.compared.methods} <= set(study.methods), name
            assert {(leveled(a), leveled(b)) for a, b in preset.compared.comparisons} <= set(study.comparisons), name
        assert all(preset.seeds_of(method) for method in study.methods), name
        assert any(method.starts_from for method in study.methods) == bool(preset.mechanism_seeds), name
        assert set(ABLATIONS) <= set(study.methods) if preset.ablation_seeds else not set(ABLATIONS) & set(study.methods)
    assert PRESETS["default"].compared.comparisons == ((RANKE, GRPO),)
    assert [(a.name, b.name) for a, b in PRESETS["policies"].study().comparisons] == [
        ("DAPO", "GRPO"), ("VA-π", "GRPO"), ("VA-π + RankE decoder", "VA-π")]
    ablations = PRESETS["ablations"].study()
    assert [(a.name, b.name) for a, b in ablations.comparisons] == [
        ("RankE", "GRPO"), ("RankE, top-4 rank-weighted", "RankE, top-4 uniform GAN"), ("RankE", "RankE, no EMA anchor"),
        ("RankE", "decoder only"), ("GRPO policy, adapted decoder", "GRPO"),
    ]  # fmt: skip


def test_the_full_demo_is_the_frontier_study_of_its_plan():
    """`--full` runs the plan of docs/results.md: GRPO and RankE at `clip` and `colorful` (the toy
    reward plus colorfulness 1:1), seeds 0-4, 400 steps in fp32 evaluated every 50 steps on 500
    held-out prompts; the decoder stage alone for 150 steps on the colorful GRPO seeds 0-2; run
    folders named <level>_<method>_seed<s>."""
    preset = PRESETS["full"]
    study = preset.study()
    assert [(a.name, b.name) for a, b in study.comparisons] == [
        ("clip: RankE", "clip: GRPO"), ("colorful: RankE", "colorful: GRPO"),
        ("colorful: GRPO policy, adapted decoder", "colorful: GRPO"),
    ]  # fmt: skip
    cfg = config_lib.load(RunConfig, "toy", [*preset.overrides, *study.methods[2].overrides], section="posttrain")
    pcfg = cfg.posttrain
    assert (cfg.precision, pcfg.steps, pcfg.eval_every, pcfg.eval_samples, pcfg.eval_split) == ("fp32", 400, 50, 500, "heldout")
    assert pcfg.rewards == {"toy_clip": 1.0, "colorfulness": 1.0} and pcfg.mode == "policy"
    assert preset.seeds == (0, 1, 2, 3, 4) and preset.seeds_of(study.methods[-1]) == (0, 1, 2)
    mechanism = config_lib.load(RunConfig, "toy", [*preset.overrides, *study.methods[-1].overrides, *preset.mechanism_overrides],
                                section="posttrain")  # fmt: skip
    assert (mechanism.posttrain.steps, mechanism.posttrain.mode, mechanism.posttrain.rewards) == (150, "decoder", pcfg.rewards)
    methods, jobs = method_jobs(Path("out"), [(spec, preset.seeds_of(spec)) for spec in study.methods[:4]], [])
    assert [job.run.name for job in jobs[:2]] == ["clip_grpo_seed0", "clip_grpo_seed1"]
    assert methods[3].runs[4] == Path("out/runs/colorful_ranke_seed4")


def test_the_study_runs_the_mechanism_level_first_then_the_mechanism_runs_then_the_rest(tmp_path, monkeypatch):
    """The order in which `run_study` hands runs to the workers (recorded instead of run): seed by
    seed, the mechanism level's runs of the mechanism seeds, then the mechanism runs from their
    GRPO runs' final policies, then the rest."""
    import ranke.demo as demo

    phases = []
    monkeypatch.setattr(demo, "_run_unfinished", lambda jobs, *args: phases.append([job.run.name for job in jobs]))
    monkeypatch.setattr(demo, "export_final_policy", lambda run: run / "final_policy.safetensors")
    preset = PRESETS["full"]
    methods, jobs = demo.run_study(tmp_path, preset, preset.study(), ["steps=4"], "toy", 2, 1, "full")
    assert phases[0] == [f"colorful_{method}_seed{seed}" for seed in (0, 1, 2) for method in ("grpo", "ranke")]
    assert phases[1] == [f"colorful_grpo_policy_adapted_decoder_seed{seed}" for seed in (0, 1, 2)]
    assert phases[2][:4] == ["clip_grpo_seed0", "clip_ranke_seed0", "colorful_grpo_seed0", "colorful_ranke_seed0"]
    assert len(phases[2]) == len(jobs) == 23 and len(methods) == 5
    mechanism_job = next(job for job in jobs if job.run.name == "colorful_grpo_policy_adapted_decoder_seed1")
    assert mechanism_job.overrides[-3:] == ("steps=150", f"policy={tmp_path / 'runs' / 'colorful_grpo_seed1' / 'final_policy.safetensors'}", "seed=1")
