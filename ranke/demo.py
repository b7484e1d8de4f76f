"""`ranke demo`: the paper's fidelity-alignment experiment in the toy world, with a report.

From the committed toy SFT policy and tokenizer, it evaluates the starting point, runs standard
GRPO (`mode=policy`, frozen decoder) and RankE (`mode=both`) for the same number of steps from
the same start with the same seeds, evaluating every `eval_every` steps on the same held-out
prompts with the same sampling seed, and writes `report.md` / `report.html` with the results
table, curves, a reward-vs-FD plot and a captioned sample grid. The runs go to worker processes
(`ranke.workers`, two at a time on two cores); a rerun reuses finished runs and continues the
others. The default demo runs one seed for 100 steps at the frontier study's higher pressure level
(`colorful`: the toy reward plus a colorfulness term, which is not realism). `--full` runs the
frontier study of docs/results.md: GRPO and RankE at two pressure levels, five paired seeds, 400
steps, and the mechanism runs (the decoder stage alone on three final GRPO policies of the higher
level). `--ablations` runs the preset's operating point with five paired seeds, three seeds of
each ablation (rank-weighted vs uniform GAN at K = 4, no EMA-consistency anchor, decoder stage
only) and the mechanism runs. `--mechanism` runs three paired seeds and the mechanism runs: the
question to ask of a new reward or toy world (does GRPO's token shift cost fidelity, and does
RankE remove the cost?).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from ranke import config as config_lib
from ranke.assets import save_asset
from ranke.backbones import load_toy_backbone
from ranke.checkpoint import MANIFEST, latest_checkpoint
from ranke.config import RunConfig
from ranke.eval.evaluate import Evaluator
from ranke.eval.manifold import MIN_FEATURES
from ranke.eval.figures import (
    curves_caption,
    plot_decoder_mechanism,
    plot_frontier,
    plot_metric,
    plot_samples,
    seed_counts,
    seeds_text,
)
from ranke.eval.page import Report, write_report
from ranke.eval.runs import RealReference, frontier_by_seed
from ranke.eval.study import Method, MethodSpec, Study
from ranke.eval.tables import (
    COLUMNS,
    SHORT,
    comparison_table,
    decoder_gain_table,
    difference_cell,
    frontier_table,
    gain_table,
    gains_over_start,
    paired_comparison,
    per_run_table,
    results_table,
)
from ranke.eval.stats import NOT_SEPARATED, ONE_SEED, verdict
from ranke.sample_folder import ModelChoice, load_backbone
from ranke.images import save_image_grid
from ranke.precision import PrecisionChoice, choose_precision, machine_description
from ranke.runlock import prepare_output_dir
from ranke.runtime import UserError, autocast, select_device
from ranke.workers import Job, run_jobs


GRPO = MethodSpec("GRPO", ("mode=policy",), "base", note="standard RL: GRPO policy stage, frozen decoder")
RANKE = MethodSpec("RankE", ("mode=both",), "ema", ("online",), "GRPO policy stage + RankE decoder stage on the same rollouts")
# With the released K = 1 every rank weight is 1, so the rank-weighted vs uniform GAN ablation
# needs K > 1: both of its arms keep the top 4 of 8 rollouts.
RANK_WEIGHTED = MethodSpec("RankE, top-4 rank-weighted", ("mode=both", "rank_top_k=4"), "ema",
                           note="K = 4 rank-selected rollouts, softmax(r / tau) weights")  # fmt: skip
UNIFORM_GAN = MethodSpec("RankE, top-4 uniform GAN", ("mode=both", "rank_top_k=4", "uniform_weights=true"), "ema",
                         note="K = 4 with all weights 1 (plain GAN on the top-K rollouts)")  # fmt: skip
NO_EMA_ANCHOR = MethodSpec("RankE, no EMA anchor", ("mode=both", "consistency_weight=0"), "ema", note="without L_consist")
DECODER_ONLY = MethodSpec("decoder only", ("mode=decoder",), "ema", note="decoder stage alone, policy frozen at SFT")
ABLATIONS = (RANK_WEIGHTED, UNIFORM_GAN, NO_EMA_ANCHOR, DECODER_ONLY)
# The mechanism (does the frozen decoder fail on the shifted tokens?): the decoder stage alone,
# started from a finished GRPO run's final policy, so the same policy's tokens are decoded by the
# frozen and by an adapted decoder.
ADAPTED = MethodSpec("GRPO policy, adapted decoder", ("mode=decoder",), "ema",
                     note="decoder stage alone on the final GRPO policy's rollouts", starts_from=GRPO)  # fmt: skip
# Levels of optimisation pressure (the frontier study of docs/results.md), lowest first: what each
# adds to the study's settings. `colorful` adds a reward term that is not realism (vivid colour).
LEVELS = {"clip": (), "colorful": ("rewards={toy_clip: 1.0, colorfulness: 1.0}",)}


def at_level(spec: MethodSpec, level: str) -> MethodSpec:
    """`spec` at pressure level `level`: named "level: name", with the level's settings before its own."""
    return replace(spec, name=f"{level}: {spec.name}", overrides=(*LEVELS[level], *spec.overrides), group=level,
                   starts_from=spec.starts_from and at_level(spec.starts_from, level))  # fmt: skip


# Every study: GRPO vs RankE; a preset with ablation or mechanism seeds extends it by those methods
# and their comparisons ((A, B): the report gives A - B).
GRPO_VS_RANKE = Study((GRPO, RANKE), ((RANKE, GRPO),))
ABLATION_COMPARISONS = ((RANK_WEIGHTED, UNIFORM_GAN), (RANKE, NO_EMA_ANCHOR), (RANKE, DECODER_ONLY))
MECHANISM_COMPARISONS = ((ADAPTED, GRPO),)  # the same GRPO policy, adapted vs frozen decoder
# The policy stage as the field runs it (issue 28's comparison), each with its paper's settings on
# the toy preset: DAPO (clip-higher, token-level loss, dynamic sampling, no KL term) and VA-π's
# pixel alignment (teacher-forced predictions of real codes scored by reconstruction, with the
# likelihood regulariser; no KL term, weight decay 1e-4), alone and with RankE's decoder stage.
# VA-π's rate 2e-6 was chosen on validation prompts (`benchmarks/grpo_sweep.py --sweep pixel`): at
# the GRPO rate 5e-5 its FD rose from 40.7 to 65.3 in 150 steps, at 1e-5 to 47.3, at 2e-6 38.2.
DAPO = MethodSpec("DAPO", ("mode=policy", "loss_type=dapo", "kl_coef=0", "dynamic_sampling_draws=1"), "base",
                  note="DAPO's policy stage as its paper trains it, frozen decoder")  # fmt: skip
VA_PI = ("kl_coef=0", "policy_weight_decay=1e-4", "policy_lr=2e-6")
PIXEL = MethodSpec("VA-π", ("mode=pixel", *VA_PI), "base", note="VA-π's pixel-space alignment of the policy, frozen decoder")
PIXEL_RANKE = MethodSpec("VA-π + RankE decoder", ("mode=pixel_and_decoder", *VA_PI), "ema", ("online",),
                         "VA-π's policy stage + RankE's decoder stage on the same rollouts")  # fmt: skip
POLICY_FAMILY = Study((GRPO, DAPO, PIXEL, PIXEL_RANKE), ((DAPO, GRPO), (PIXEL, GRPO), (PIXEL_RANKE, PIXEL)))


@dataclass(frozen=True)
class DemoPreset:
    """What a demo size changes on top of the config's `posttrain` section (configs/toy.yaml)."""

    overrides: tuple[str, ...]
    seeds: tuple[int, ...]  # paired seeds of the compared methods
    ablation_seeds: tuple[int, ...] = ()  # seeds of each ablation; () = none
    mechanism_seeds: tuple[int, ...] = ()  # seeds of the mechanism runs (a subset of `seeds`); () = none
    # pressure levels (LEVELS), lowest first: the compared methods at each, the mechanism runs at
    # the last; () = one level, the settings as given
    levels: tuple[str, ...] = ()
    mechanism_overrides: tuple[str, ...] = ()  # what the mechanism runs set on top, e.g. their own steps
    compared: Study = GRPO_VS_RANKE  # the methods run at every level, with their comparisons

    def study(self) -> Study:
        """The methods this preset runs and the comparisons its report makes."""
        if not self.levels:
            study = self.compared
            if self.ablation_seeds:
                study = study.extended(ABLATIONS, ABLATION_COMPARISONS)
            return study.extended((ADAPTED,), MECHANISM_COMPARISONS) if self.mechanism_seeds else study
        study = Study(())
        for level in self.levels:
            methods = tuple(at_level(spec, level) for spec in self.compared.methods)
            comparisons = tuple((at_level(a, level), at_level(b, level)) for a, b in self.compared.comparisons)
            study = study.extended(methods, comparisons)
        if self.mechanism_seeds:
            adapted = at_level(ADAPTED, self.levels[-1])
            study = study.extended((adapted,), ((adapted, adapted.starts_from),))
        return study

    def seeds_of(self, method: MethodSpec) -> tuple[int, ...]:
        """The training seeds of one method of the study."""
        if method in ABLATIONS:
            return self.ablation_seeds
        return self.mechanism_seeds if method.starts_from else self.seeds


# The frontier study's settings (its plan in docs/results.md): 400 steps in fp32, evaluated every 50
# steps on the 500 held-out prompts; the mechanism runs keep the preset's 150 decoder steps.
FRONTIER = ("precision=fp32", "steps=400", "eval_every=50", "save_every=50", "eval_samples=500", "eval_split=heldout",
            "grid_every=100000")  # fmt: skip
PRESETS = {
    "quick": DemoPreset(
        ("steps=8", "prompts_per_step=4", "group_size=4", "eval_samples=64", "eval_every=4", "disc_start=2"), (0,)
    ),
    # one seed at the frontier study's higher pressure level, for as many steps as fit about 10 minutes
    "default": DemoPreset(("steps=100", *LEVELS["colorful"]), (0,)),
    # the frontier study: both levels, five paired seeds, the mechanism at the higher level
    "full": DemoPreset(FRONTIER, (0, 1, 2, 3, 4), (), (0, 1, 2), ("clip", "colorful"), ("steps=150",)),
    # the preset's operating point with the ablations (the first study of docs/results.md)
    "ablations": DemoPreset((), (0, 1, 2, 3, 4), (0, 1, 2), (0, 1, 2)),
    # the question of a new reward or world: does GRPO's token shift cost fidelity, and does RankE remove it?
    "mechanism": DemoPreset((), (0, 1, 2), (), (0, 1, 2)),
    # the policy stage's family at the preset: GRPO, DAPO, VA-π, and VA-π with the decoder stage
    "policies": DemoPreset((), (0, 1, 2), compared=POLICY_FAMILY),
}


def run_demo(
    out_dir: str, preset_name: str = "default", config: str = "toy", overrides: list[str] = (), workers: int = 2
) -> dict:
    if preset_name not in PRESETS:
        raise UserError(f"unknown demo preset '{preset_name}' (one of: {', '.join(PRESETS)})")
    preset = PRESETS[preset_name]
    out = prepare_output_dir(out_dir)
    started = time.perf_counter()
    settings = [*preset.overrides, *overrides]
    cfg = config_lib.load(RunConfig, config, settings, section="posttrain")
    pcfg = cfg.posttrain
    if pcfg.eval_samples < MIN_FEATURES:
        raise UserError(f"the demo evaluates its runs: set eval_samples >= {MIN_FEATURES}")
    device = select_device(cfg.device)
    threads = max(1, (os.cpu_count() or 1) // workers)
    precision = study_precision(out, cfg, device, threads)
    settings.append(f"precision={precision.name}")  # every run of the study computes alike
    print(f"demo[{preset_name}]: precision {precision.name} ({precision.reason})")

    print(f"demo[{preset_name}]: evaluating the SFT starting point on {pcfg.eval_samples} held-out prompts")
    backbone, _ = load_toy_backbone(pcfg.policy, pcfg.tokenizer, device)
    evaluator = Evaluator(cfg, device, n=pcfg.eval_samples, seed=pcfg.eval_seed)
    with autocast(device, precision.name):  # the runs are evaluated under their precision too
        sft = {**evaluator(backbone, preview=32), **evaluator.reconstruction(backbone.tokenizer)}
    (out / "sft_metrics.json").write_text(json.dumps(sft, indent=2))
    save_image_grid(evaluator.preview, out / "sft_samples.png", nrow=8)
    RealReference.from_evaluator(evaluator).save(out)

    study = preset.study()
    methods, jobs = run_study(out, preset, study, settings, config, workers, threads, preset_name)

    with autocast(device, precision.name):  # as the SFT start's reconstruction above
        mechanism = decoder_mechanism(evaluator, methods, device)
    (out / "mechanism.json").write_text(json.dumps(mechanism, indent=2))
    commands = [" ".join(["ranke posttrain", "--config", config, "--out", str(job.run), *job.overrides]) for job in jobs]
    minutes = (time.perf_counter() - started) / 60
    report_paths = build_report(out, sft, study, methods, preset_name, pcfg, preset.seeds, commands, minutes, mechanism, precision)
    print(f"demo[{preset_name}]: {minutes:.1f} min -> {report_paths[0]} and {report_paths[1]}")
    return {"report": str(report_paths[0]), "html": str(report_paths[1]), "minutes": round(minutes, 2)}


PRECISION_FILE = "precision.json"


def study_precision(out: Path, cfg: RunConfig, device: torch.device, threads: int) -> PrecisionChoice:
    """The one precision of every run of the study in `out`, recorded in OUT/precision.json with its
    reason and the machine that chose it. A study that has started keeps the precision of its runs
    (`precision=auto` takes it; another explicit value is refused, as is a folder whose runs already
    differ); a new one asks `choose_precision` at the workers' thread count. bf16 and fp32 sampling
    move a run's FD by up to 2.4 points (docs/results.md): mixed runs would compare arithmetic too."""
    recorded = out / PRECISION_FILE
    held = {yaml.safe_load(path.read_text()).get("precision") for path in out.glob("runs/*/config.yaml")}
    if recorded.is_file():
        held.add(json.loads(recorded.read_text())["run_precision"])
    if len(held) > 1:
        raise UserError(f"{out} holds runs in {' and '.join(sorted(map(str, held)))}: a study's runs share one precision; choose a new --out")
    if held and cfg.precision not in ("auto", *held):
        raise UserError(
            f"{out}'s runs were started in {held.pop()}: precision={cfg.precision} would mix precisions within the "
            "study; pass the study's precision (or auto), or choose a new --out"
        )
    if recorded.is_file():
        saved = json.loads(recorded.read_text())
        return PrecisionChoice(saved["run_precision"], cfg.precision, saved["run_precision_reason"])
    if held:  # a study started before precision.json existed
        choice, machine = PrecisionChoice(held.pop(), cfg.precision, "the study's runs were started in it"), "not recorded"
    else:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # measured as the workers will run
        try:
            choice, machine = choose_precision(cfg.precision, device, cfg.gpt.dim), machine_description()
        finally:
            torch.set_num_threads(previous_threads)
    recorded.write_text(json.dumps({**choice.as_record(), "machine": machine}, indent=2))
    return choice


def run_study(
    out: Path, preset: DemoPreset, study: Study, settings: list[str], config: str, workers: int, threads: int, preset_name: str
) -> tuple[list[Method], list[Job]]:
    """Every run of the `study`, seed by seed (a stopped study leaves complete pairs), in an order
    that starts the mechanism runs early: first the runs of the mechanism runs' level at their
    seeds, then the mechanism runs (each from its seed's source run's final policy), then the rest."""
    trained = [(method, preset.seeds_of(method)) for method in study.methods if method.starts_from is None]
    methods, jobs = method_jobs(out, trained, settings)
    jobs.sort(key=_job_seed)  # stable: the study's method order within a seed
    continuing = [method for method in study.methods if method.starts_from is not None]
    first = {(spec.group, seed) for spec in continuing for seed in preset.seeds_of(spec)}
    level_of = {run: method.spec.group for method in methods for run in method.runs}
    _run_unfinished([job for job in jobs if (level_of[job.run], _job_seed(job)) in first], config, workers, threads, preset_name)
    for spec in continuing:
        source = next(method for method in methods if method.spec == spec.starts_from)
        source_runs = dict(zip(preset.seeds_of(spec.starts_from), source.runs))  # absolute: read from anywhere
        per_seed = {seed: [*preset.mechanism_overrides, f"policy={export_final_policy(source_runs[seed]).resolve()}"]
                    for seed in preset.seeds_of(spec)}  # fmt: skip
        continued, continued_jobs = method_jobs(out, [(spec, preset.seeds_of(spec))], settings, per_seed)
        _run_unfinished(continued_jobs, config, workers, threads, preset_name)
        methods, jobs = methods + continued, jobs + continued_jobs
    _run_unfinished(jobs, config, workers, threads, preset_name)  # the rest (finished runs are skipped)
    return methods, jobs


def _job_seed(job: Job) -> int:
    return int(job.overrides[-1].removeprefix("seed="))  # `method_jobs` sets it last


def _run_unfinished(jobs: list[Job], config: str, workers: int, threads: int, preset_name: str) -> None:
    """Run the jobs whose latest checkpoint is not yet at their `steps` (the others are done: a
    rerun of the demo reuses them); each continues from its latest checkpoint."""
    todo = [job for job in jobs if _checkpoint_step(job.run) < _steps(config, job)]
    if todo:
        print(f"demo[{preset_name}]: {len(todo)} of {len(jobs)} runs to do, {workers} at a time")
        run_jobs(todo, config, workers, threads)


def _steps(config: str, job: Job) -> int:
    return config_lib.load(RunConfig, config, list(job.overrides), section="posttrain").posttrain.steps


def _checkpoint_step(run: Path) -> int:
    latest = latest_checkpoint(run)
    return 0 if latest is None else json.loads((latest / MANIFEST).read_text())["step"]


def method_jobs(
    out: Path, studied: list[tuple[MethodSpec, tuple[int, ...]]], settings, per_seed: dict[int, list[str]] | None = None
) -> tuple[list[Method], list[Job]]:
    """A `Method` per (method, seeds) and a posttrain job per seed (run directory OUT/runs/<slug>_seed<s>)."""
    methods, jobs = [], []
    for spec, seeds in studied:
        runs = [out / "runs" / f"{_slug(spec.name)}_seed{seed}" for seed in seeds]
        for seed, run in zip(seeds, runs):
            extra_settings = (per_seed or {}).get(seed, [])
            jobs.append(Job(run, (*settings, *spec.overrides, *extra_settings, f"seed={seed}")))
        methods.append(Method(spec, runs))
    return methods, jobs


def export_final_policy(run: Path) -> Path:
    """The online policy of a post-training run's latest checkpoint as a policy asset (fp32),
    `RUN/final_policy.safetensors`, so another run can start from it (`posttrain.policy`)."""
    target = run / "final_policy.safetensors"
    if not target.is_file():
        backbone, cfg = load_backbone(ModelChoice(checkpoint=str(run), overrides=("device=cpu",)))
        save_asset(target, "policy", {"gpt": cfg.gpt, "text": cfg.text}, backbone.policy.state_dict(), dtype=torch.float32)
    return target


def decoder_mechanism(evaluator: Evaluator, methods: list[Method], device) -> dict:
    """Per run with a trained decoder: how its EMA decoder renders the ground-truth codes of the
    held-out images (`Evaluator.reconstruction`), beside the base decoder's figures."""
    rows = {}
    for method in methods:
        for run in method.runs:
            if method.decoder == "ema":
                ema_decoder = ModelChoice(checkpoint=str(run), decoder="ema", overrides=(f"device={device}",))
                backbone, _ = load_backbone(ema_decoder)
                rows[run.name] = {"method": method.name, **evaluator.reconstruction(backbone.tokenizer)}
    return rows


def _slug(name: str) -> str:
    """A method's run-folder name: ASCII letters, digits and underscores ("VA-π" -> "va_pi")."""
    name = name.lower().replace("π", "pi")
    return re.sub("_+", "_", "".join(c if c.isascii() and c.isalnum() else "_" for c in name)).strip("_")


def describe(sft: dict, methods: list[Method], compared: list[tuple[Method, Method]], real: dict | None = None) -> str:
    """Plain sentences of what the numbers say about `methods` and the `compared` pairs, computed
    from the intervals: a difference is called better or worse only when its 95% interval over
    seeds excludes 0."""
    lines = []
    counts = seed_counts(methods)
    if real is not None:
        kid_se = f" (standard error {real['kid_se']:.3f})" if real.get("kid_se") else ""
        lines.append(
            f"The evaluation's own noise: a second real image of each of the same {real['n']} prompts is FD "
            f"{real['fd']:.1f} and KID {real['kid']:.3f}{kid_se} from the first, about what a perfect generator "
            "would score; FD or KID differences well inside that are sampling noise of the evaluation."
        )
        lines.append("")  # a paragraph of its own in the markdown
    if counts[1] < 2:
        lines.append(
            "One seed per method: each figure is one training run evaluated once, so there is no interval and "
            "nothing here is called better or worse. One seed shows what a run does to each metric, to set "
            "against the noise floor above; it cannot show whether RankE and GRPO differ, because the spread "
            "between training seeds is not measured. That needs paired seeds (`ranke demo --full`)."
        )
    else:
        lines.append(
            f"Paired seeds ({seeds_text(*counts)}): each seed gives every method the same start, prompts and rollout stream. A "
            "difference is called only where its 95% interval excludes 0; elsewhere it is not separated."
        )
    lines.append("")
    for a, b in compared:
        title = f"{a.name} ({a.decoder} decoder) vs {b.name} ({b.decoder} decoder)"
        lines.append(_summary(title, a.name, paired_comparison(a, b)))
    for method in methods:
        gains = gains_over_start(sft, method)
        if gains:
            lines.append(_summary(f"{method.name} ({method.decoder} decoder) vs the SFT start", method.name, gains))
    return "\n".join(lines)


def _summary(title: str, subject: str, differences: dict) -> str:
    """One list item: the differences an interval separates, then those it does not."""
    n = min(difference.n for difference in differences.values())
    cells = {key: difference_cell(differences[key], fmt) for key, _, fmt, _ in COLUMNS if key in differences}
    if n < 2:
        values = ", ".join(f"{SHORT[key]} {cells[key]}" for key in cells)
        return f"* {title}, one seed: {values} ({ONE_SEED})."
    called = [f"{verdict(differences[key], better, subject, SHORT[key])}, {cells[key]}"
              for key, _, _, better in COLUMNS if key in differences and differences[key].excludes_zero()]  # fmt: skip
    unseparated = [f"{SHORT[key]} {cells[key]}" for key in cells if not differences[key].excludes_zero()]
    text = f"* {title}, {n} seeds: " + ("; ".join(called) if called else "no metric separated")
    if unseparated:
        text += f". {NOT_SEPARATED.capitalize()}: " + "; ".join(unseparated)
    return text + "."


def reward_description(weights: dict[str, float]) -> str:
    """The training reward's terms and weights, e.g. `toy_clip` or `1 x toy_clip + 1 x colorfulness`."""
    if len(weights) == 1:
        return f"`{next(iter(weights))}`"
    return " + ".join(f"{weight:g} x `{name}`" for name, weight in weights.items())


def build_report(
    out: Path, sft: dict, study: Study, methods: list[Method], preset_name, pcfg, seeds, commands, minutes,
    mechanism: dict | None = None, precision: PrecisionChoice | None = None,
) -> tuple[Path, Path]:
    """`report.md` / `report.html` in `out` from the SFT metrics, the saved `RealReference`, the runs
    of the `study`'s methods and the comparisons it makes, (`decoder_mechanism`) the trained
    decoders' reconstructions of ground-truth codes and the study's precision."""
    reference = RealReference.load(out)
    real = reference.metrics
    compared = study.compared(methods)
    last_level = methods[-1].spec.group if methods else ""  # the highest pressure level
    sampled = [method for method in methods  # the compared methods' columns beside the real image and SFT
               if method.spec.group == last_level and _headline(method.spec)]  # fmt: skip
    samples, sample_files = plot_samples(out, sft, sampled, reference)
    sections = [
        ("Reward against fidelity", _frontier(out, sft, methods, compared, real)),
        ("Methods", "\n".join(f"* {method.name}: {method.spec.note}." for method in methods)),
        ("Results", _results(out, sft, methods, compared, real, mechanism)),
        ("What the numbers say", describe(sft, methods, compared, real)),
        ("Curves", _curves(out, sft, methods, real)),
        ("Samples", samples + "\n\n" + "\n".join(f"![{label}]({name})" for label, name in sample_files)),
        ("Every run", per_run_table(methods) + "\nKID ± its standard error over disjoint subsets of the images."),
        ("Exact commands", "```\n" + "\n".join(commands) + "\n```\nEach run's resolved config is `runs/<run>/config.yaml`."),
    ]
    intro = _intro(out, preset_name, pcfg, seeds, minutes, precision)
    levels = list(dict.fromkeys(spec.group for spec in study.methods if spec.group))
    if levels:
        intro += " Each method runs at every level of optimisation pressure: " + "; ".join(
            f"`{level}`: {_level_text(level)}" for level in levels) + "."  # fmt: skip
    return write_report(Report(f"RankE in the toy world: {report_title(study)}", intro, sections), out)


def report_title(study: Study) -> str:
    """The compared methods by their names without a level ("GRPO vs RankE"; "A, B, C and D"), the
    ablations and the runs that start from another method's policies left out."""
    names = list(dict.fromkeys(spec.name.removeprefix(f"{spec.group}: ") for spec in study.methods if _headline(spec)))
    return " vs ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]


def _headline(spec: MethodSpec) -> bool:
    """One of the methods the study compares from the SFT start: not an ablation, not a run that
    continues another method's final policy."""
    return spec.starts_from is None and spec not in ABLATIONS


def _frontier(out: Path, sft: dict, methods: list[Method], compared, real: dict | None) -> str:
    """The section the report leads with: per level of the study, the reward-fidelity plane of the
    methods that start from SFT and, with paired seeds, the fidelity metrics at matched reward
    gain (`ranke.eval.frontier`)."""
    sections = []
    for level in dict.fromkeys(method.spec.group for method in methods):
        planed = [method for method in methods if method.spec.group == level and method.spec.starts_from is None]
        figure = f"frontier_{level}.png" if level else "frontier.png"
        text = f"**Level `{level}`** ({_level_text(level)}).\n\n" if level else ""
        text += f"![{plot_frontier(sft, planed, out / figure, real)}]({figure})"
        if min((len(frontier_by_seed(method, sft, "fd")) for method in planed), default=0) >= 2:
            pairs = [(a, b) for a, b in compared if a in planed and b in planed]
            text += "\n\nAt matched reward gain (the largest every run of both methods reaches), paired by seed:\n\n"
            text += frontier_table(sft, pairs)
        sections.append(text)
    return "\n\n".join(sections)


def _level_text(level: str) -> str:
    return "; ".join(LEVELS[level]) or "the preset's reward"


def _curves(out: Path, sft: dict, methods: list[Method], real: dict | None) -> str:
    """One figure per metric against steps, with their shared caption: the methods that start from
    SFT (a run that starts from another method's final policy has no step 0 at the SFT start; the
    Results tables and the mechanism figure hold it)."""
    from_sft = [method for method in methods if method.spec.starts_from is None]
    banded = [plot_metric(sft, from_sft, key, out / f"curve_{key}.png", real) for key, *_ in COLUMNS]
    caption = curves_caption(from_sft, any(banded), real is not None)
    if len(from_sft) < len(methods):
        caption += " The runs that start from another method's final policy are in the Results tables, not here."
    return caption + "\n\n" + "\n".join(f"![{title} against post-training steps](curve_{key}.png)" for key, title, _, _ in COLUMNS)


def _intro(out: Path, preset_name, pcfg, seeds, minutes, precision: PrecisionChoice | None) -> str:
    intro = (
        f"The toy world's version of the paper's experiment (preset `{preset_name}`, {minutes:.1f} min). "
        f"From the committed toy SFT policy and tokenizer, each method post-trains for {pcfg.steps} steps of "
        f"{pcfg.prompts_per_step} prompts x {pcfg.group_size} rollouts against the reward {reward_description(pcfg.rewards)}, with "
        f"{'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))}. Every evaluation samples the "
        f"same {pcfg.eval_samples} held-out prompts with the same sampling seed ({pcfg.eval_seed})."
    )
    if precision is not None:
        chosen_on = json.loads((out / PRECISION_FILE).read_text())["machine"]
        intro += (
            f" Every run trained and every table and figure was sampled in **{precision.name}** ({precision.reason}); "
            f"chosen on: {chosen_on}."
        )
    return intro


def _results(out: Path, sft: dict, methods: list[Method], compared, real: dict | None, mechanism: dict | None) -> str:
    """The Results section: the table and what its columns are, each comparison of the study, the
    gains over the start and, with the mechanism runs, the mechanism figure."""
    arrows = ", ".join(f"{SHORT[key]} {better}" for key, _, _, better in COLUMNS if better)
    results = (
        results_table(sft, methods, real)
        + "\nMean over seeds at the last evaluation; ± is the half-width of the 95% interval (Student t over "
        "seeds), absent with one seed. Better is: " + arrows + ". real images: a second real image of every "
        "prompt scored like a sample (for FD and KID, the evaluation's noise floor). reward: the training reward "
        "model; CLIP score: a second toy CLIP never used in training (reward hacking of the first shows as a "
        "gap); FD and KID: Frechet and kernel distances of toy features to the real images of the same "
        "prompts; precision and density (fidelity: samples on the real images' manifold) and recall and coverage "
        "(diversity: real images with a sample near them), k = 5 nearest neighbours in the same features, take FD "
        "apart; density is about 1 for samples distributed as real images and rises above 1 where samples crowd "
        "into dense real regions, so no direction is better; verifier accuracy: exact object/attribute/relation "
        "check; token KL: KL between the codebook histograms of the sampled tokens and of the real images' tokens; "
        "round-trip agreement: the share of a sample's tokens the frozen encoder gives back from its decoded image "
        "(real codes: the same for the real images' own codes through the same decoder, its reference); "
        "colorfulness: Hasler and Suesstrunk's "
        "colorfulness, where real images are the reference and no direction is better (a reward that favours "
        "vivid colour raises it).\n"
    )
    for a, b in compared:
        results += f"\n{a.name} - {b.name}, paired by seed ({a.decoder} vs {b.decoder} decoder):\n\n" + comparison_table(a, b)
    results += "\nGain over the SFT start (mean [95% interval] over seeds):\n\n" + gain_table(sft, methods)
    by_spec = {method.spec: method for method in methods}
    for adapted in (method for method in methods if method.spec.starts_from in by_spec and mechanism):
        figure = f"mechanism_{adapted.spec.group}.png" if adapted.spec.group else "mechanism.png"
        frozen = by_spec[adapted.spec.starts_from]
        caption = plot_decoder_mechanism(frozen, adapted, mechanism, sft, out / figure)
        real_codes_fd = {name: row["recon_fd"] for name, row in mechanism.items()}
        results += f"\n![{caption}]({figure})\n\nWhat the adapted decoder's FD gain is made of, paired by seed:\n\n"
        results += decoder_gain_table(frozen, adapted, sft["recon_fd"], real_codes_fd)
    return results
