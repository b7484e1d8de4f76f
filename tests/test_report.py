"""The report built from fake but structurally real runs: paired intervals in its tables and text,
figures that exist, responsive HTML; the comparisons a study declares; the page's rendering of
Markdown; and the grid tiles the sample grid reads back."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup
from PIL import Image

from ranke.config import RunConfig
from ranke.demo import ADAPTED, GRPO, GRPO_VS_RANKE, POLICY_FAMILY, PRESETS, RANKE, build_report, describe, report_title
from ranke.eval.figures import plot_metric, seed_counts, seeds_text
from ranke.eval.page import render_html
from ranke.eval.runs import RealReference
from ranke.eval.study import Method, Study
from ranke.eval.tables import COLUMNS
from ranke.toy.data import heldout_prompts
from ranke.images import grid_tiles, image_grid, save_image_grid

PREVIEW = 8
SFT = {"reward": 89.0, "clip_score": 89.5, "fd": 45.0, "kid": 1.5, "kid_se": 0.4, "precision": 0.72, "recall": 0.61,
       "density": 0.95, "coverage": 0.83, "verifier_accuracy": 0.55, "token_kl": 0.05, "roundtrip_agreement": 0.58,
       "roundtrip_agreement_real": 0.66, "colorfulness": 24.0, "preview_correct": [True, False] * 4}  # fmt: skip
# per seed: (GRPO, RankE) final values; RankE - GRPO FD: -2, -3, -4 -> mean -3, half 4.302653 / sqrt(3) = 2.484
FINAL_FD = {0: (48.0, 46.0), 1: (47.0, 44.0), 2: (49.0, 45.0)}
FINAL_REWARD = {0: (90.0, 91.0), 1: (91.0, 90.0), 2: (90.5, 91.0)}  # differences +1, -1, +0.5: not separated


def _images(seed: int) -> torch.Tensor:
    return torch.rand(PREVIEW, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _write_run(run, seed: int, decoders: list[str], fd: float, reward: float) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed: {seed}\ndevice: cpu\n")
    records = []
    for step, fraction in ((4, 0.5), (8, 1.0)):
        for decoder in decoders:
            values = {key: SFT[key] for key, *_ in COLUMNS}
            values.update(fd=SFT["fd"] + fraction * (fd - SFT["fd"]), reward=SFT["reward"] + fraction * (reward - SFT["reward"]))
            records.append({"step": step, "policy": "online", "decoder": decoder, "n": 64, **values, "kid_se": 0.3,
                            "preview_correct": [bool((i + seed) % 3) for i in range(PREVIEW)]})  # fmt: skip
            save_image_grid(_images(seed * 10 + step), run / f"eval_samples_{step:06d}_{decoder}.png", nrow=8)
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _build(out, seeds, ranke_spec=RANKE):
    out.mkdir()
    save_image_grid(_images(99), out / "sft_samples.png", nrow=8)
    real = {key: SFT[key] - 5 for key, *_ in COLUMNS} | {"n": 64, "kid_se": 0.2}
    images = (_images(98).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    RealReference(heldout_prompts()[:PREVIEW], images, real).save(out)
    grpo, ranke = [], []
    for seed in seeds:
        _write_run(out / "runs" / f"grpo_seed{seed}", seed, ["base"], FINAL_FD[seed][0], FINAL_REWARD[seed][0])
        _write_run(out / "runs" / f"ranke_seed{seed}", seed, ["ema", "online"], FINAL_FD[seed][1], FINAL_REWARD[seed][1])
        grpo.append(out / "runs" / f"grpo_seed{seed}")
        ranke.append(out / "runs" / f"ranke_seed{seed}")
    methods = [Method(GRPO, grpo), Method(ranke_spec, ranke)]
    study = GRPO_VS_RANKE if ranke_spec == RANKE else Study((GRPO, ranke_spec), ((ranke_spec, GRPO),))
    md, html = build_report(out, SFT, study, methods, "test", RunConfig().posttrain, seeds, ["ranke posttrain ..."], 0.5)
    return md.read_text(), html.read_text()


def _section(markdown: str, heading: str) -> str:
    return markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_multi_seed_report_tables_intervals_and_verdicts(tmp_path):
    markdown, html = _build(tmp_path / "report", [0, 1, 2])
    fd_row = next(line for line in markdown.splitlines() if line.startswith("| FD (toy features) |"))
    assert "| 45.0 | 48.0 | -3.0 [-5.5, -0.5] | 3 | RankE lower FD (better) |" in fd_row
    reward_row = next(line for line in markdown.splitlines() if line.startswith("| reward (toy CLIP, train) |"))
    assert reward_row.endswith("| 3 | not separated |")
    said = _section(markdown, "What the numbers say")
    assert "RankE lower FD (better), -3.0 [-5.5, -0.5]" in said and "Not separated: reward +0.17" in said
    assert "Paired seeds (3 seeds per method)" in said and "one seed" not in said.lower()
    # GRPO's final FD minus SFT's: +3, +2, +4 -> +3.0 [+0.5, +5.5]: worse
    assert "GRPO higher FD (worse), +3.0 [+0.5, +5.5]" in said
    results = _section(markdown, "Results")
    assert "| GRPO | base | 8 | 3 | 90.50 ± 1.24 |" in results  # mean 90.5, s 0.5 -> half 4.302653 * 0.5 / sqrt(3)
    curves = _section(markdown, "Curves")
    assert "3 seeds per method" in curves and "shaded: its 95% interval (Student t over seeds)" in curves
    _check_figures_and_html(tmp_path / "report", markdown, html)


def test_methods_with_different_seed_counts_say_both(tmp_path):
    """A study's mechanism runs may have fewer seeds than the methods they continue: the text and
    the captions give the range, not the smallest or the largest count alone."""
    grpo = [tmp_path / f"grpo_seed{seed}" for seed in (0, 1, 2)]
    adapted = [tmp_path / f"adapted_seed{seed}" for seed in (0, 1)]
    for seed, run in enumerate(grpo):
        _write_run(run, seed, ["base"], FINAL_FD[seed][0], FINAL_REWARD[seed][0])
    for seed, run in enumerate(adapted):
        _write_run(run, seed, ["ema"], FINAL_FD[seed][1], FINAL_REWARD[seed][1])
    methods = [Method(GRPO, grpo), Method(ADAPTED, adapted)]
    assert seed_counts(methods) == (2, 3)
    assert seeds_text(*seed_counts(methods)) == "2 to 3 seeds per method"
    assert seeds_text(*seed_counts(methods[:1])) == "3 seeds per method"
    assert seeds_text(*seed_counts([Method(GRPO, grpo[:1])])) == "one seed per method"
    assert "Paired seeds (2 to 3 seeds per method)" in describe(SFT, methods, [])


def test_a_legend_too_wide_for_two_columns_takes_one_and_keeps_the_plot_s_width(tmp_path):
    """Long method names in two legend columns would widen the saved image (the plot shrinking in
    the page); in one column the image keeps the figure's width."""
    runs = [tmp_path / f"grpo_seed{seed}" for seed in (0, 1)]
    for seed, run in enumerate(runs):
        _write_run(run, seed, ["base"], FINAL_FD[seed][0], FINAL_REWARD[seed][0])
    long_names = [Method(replace(GRPO, name=f"{level}: GRPO policy, adapted decoder"), runs) for level in "ab"]
    widths = {}
    for name, methods in (("short", [Method(GRPO, runs)]), ("long", long_names)):
        plot_metric(SFT, methods, "fd", tmp_path / f"{name}.png")
        widths[name] = Image.open(tmp_path / f"{name}.png").width
    assert widths["long"] <= widths["short"] * 1.05


def test_one_seed_report_calls_nothing(tmp_path):
    markdown, html = _build(tmp_path / "report", [0])
    said = _section(markdown, "What the numbers say")
    assert "One seed per method" in said and "one seed: no interval" in said
    assert "(better)" not in said and "(worse)" not in said
    assert "one seed: no interval" in _section(markdown, "Results")  # the comparison table's verdicts
    assert "(better)" not in _section(markdown, "Results") and "(worse)" not in _section(markdown, "Results")
    curves = _section(markdown, "Curves")
    assert "shaded" not in curves and "one seed per method" in curves and "(one seed: no band)" in curves
    _check_figures_and_html(tmp_path / "report", markdown, html)


def _check_figures_and_html(out, markdown: str, html: str) -> None:
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(figures) == len(COLUMNS) + 3  # a figure per metric, the Pareto plot, the samples in two
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert html.count("data:image/png;base64,iVBOR") == len(figures)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "`" not in html and "<code>test</code>" in html
    assert "image-rendering" not in html


def test_grid_tiles_read_back_the_images_of_a_grid():
    images = torch.rand(11, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    grid = image_grid(images, nrow=4)
    tiles = grid_tiles(grid, 11, nrow=4)
    assert tiles.shape == (11, 5, 7, 3)
    np.testing.assert_array_equal(tiles, (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="does not hold"):
        grid_tiles(grid, 12, nrow=5)


def test_runs_evaluated_before_kid_existed_show_n_a(tmp_path):
    out = tmp_path / "report"
    _build(out, [0, 1])
    run = out / "runs" / "grpo_seed1"
    records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    (run / "eval.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kid"}) + "\n" for r in records))
    grpo = Method(GRPO, [out / "runs" / "grpo_seed0", run])
    ranke = Method(RANKE, [out / "runs" / "ranke_seed0", out / "runs" / "ranke_seed1"])
    markdown = build_report(out, SFT, GRPO_VS_RANKE, [grpo, ranke], "test", RunConfig().posttrain, [0, 1], [], 0.5)[0].read_text()
    assert "| GRPO | base | 8 | 2 | " in markdown and " n/a " in _section(markdown, "Results")
    kid_row = next(line for line in markdown.splitlines() if line.startswith("| KID (toy features) |"))
    assert kid_row.endswith("| 1 | one seed: no interval |")  # only seed 0 has KID on both sides


NEW_KEYS = ("precision", "recall", "density", "coverage", "roundtrip_agreement", "roundtrip_agreement_real")


def test_runs_evaluated_before_the_manifold_and_round_trip_metrics_show_n_a(tmp_path):
    """eval.jsonl files written before these metrics existed still make a report: n/a in their
    columns, no comparison or gain on them."""
    out = tmp_path / "report"
    _build(out, [0, 1])
    for run in (out / "runs").iterdir():
        records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
        (run / "eval.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k not in NEW_KEYS}) + "\n" for r in records))
    grpo = Method(GRPO, [out / "runs" / "grpo_seed0", out / "runs" / "grpo_seed1"])
    ranke = Method(RANKE, [out / "runs" / "ranke_seed0", out / "runs" / "ranke_seed1"])
    markdown = build_report(out, SFT, GRPO_VS_RANKE, [grpo, ranke], "test", RunConfig().posttrain, [0, 1], [], 0.5)[0].read_text()
    titles = [title for _, title, _, _ in COLUMNS]
    new_columns = [titles.index(title) for key, title, _, _ in COLUMNS if key in NEW_KEYS]
    for section, first in (("Results", "| GRPO | base | 8 | 2 | "), ("Every run", "| grpo_seed1 | 1 | base | 8 | ")):
        row = next(line for line in _section(markdown, section).splitlines() if line.startswith(first))
        cells = [cell.strip() for cell in row.strip("|").split("|")[4:]]
        assert [cells[i] for i in new_columns] == ["n/a"] * len(NEW_KEYS), row
        assert "n/a" not in [cell for i, cell in enumerate(cells) if i not in new_columns], row
    sft_row = next(line for line in markdown.splitlines() if line.startswith("| SFT (start) |"))
    assert "| 0.720 | 0.610 | 0.950 | 0.830 |" in sft_row  # the start has them
    assert not any(line.startswith(("| precision (toy features) |", "| round-trip agreement |")) for line in markdown.splitlines())


def test_real_reference_survives_save_and_load(tmp_path):
    images = (_images(3).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    RealReference(heldout_prompts()[:PREVIEW], images, {"fd": 6.1, "n": 300}).save(tmp_path)
    loaded = RealReference.load(tmp_path)
    assert loaded.prompts == heldout_prompts()[:PREVIEW] and loaded.metrics == {"fd": 6.1, "n": 300}
    np.testing.assert_array_equal(loaded.images, images)


def test_mechanism_figure_pairs_the_frozen_and_adapted_decoder_by_seed(tmp_path, monkeypatch):
    """With the adapted-decoder runs and the reconstructions, the report shows the mechanism
    figure and the paired comparison of the same GRPO policy's tokens under the two decoders; the
    curves against steps leave the adapted-decoder runs out (their step 0 is not the SFT start)."""
    import ranke.demo

    out = tmp_path / "report"
    _build(out, [0, 1])
    drawn, plot = set(), ranke.demo.plot_metric

    def recording_plot(sft, methods, *rest):
        drawn.update(method.name for method in methods)
        return plot(sft, methods, *rest)

    monkeypatch.setattr(ranke.demo, "plot_metric", recording_plot)
    adapted = []
    for seed in (0, 1):
        run = out / "runs" / f"grpo_policy_adapted_decoder_seed{seed}"
        _write_run(run, seed, ["ema"], FINAL_FD[seed][0] - 1.0, FINAL_REWARD[seed][0])
        adapted.append(run)
    methods = [Method(GRPO, [out / "runs" / f"grpo_seed{s}" for s in (0, 1)]), Method(ADAPTED, adapted)]
    reconstruction = {run.name: {"method": "GRPO policy, adapted decoder", "recon_fd": 27.5} for run in adapted}
    study = Study((GRPO, ADAPTED), ((ADAPTED, GRPO),))
    markdown = build_report(out, SFT | {"recon_fd": 27.8}, study, methods, "test", RunConfig().posttrain, [0, 1], [], 0.5,
                            reconstruction)[0].read_text()  # fmt: skip
    assert "![Left: FD of the final GRPO policy's samples decoded by the frozen decoder" in markdown
    assert (out / "mechanism.png").is_file()
    fd_row = next(line for line in markdown.splitlines() if line.startswith("| FD (toy features) |"))
    assert "| -1.0 [-1.0, -1.0] | 2 | GRPO policy, adapted decoder lower FD (better) |" in fd_row
    curves = _section(markdown, "Curves")
    assert drawn == {"GRPO"} and "2 seeds per method" in curves and "start from another method's final policy are in the Results tables" in curves


def test_a_renamed_method_keeps_its_comparison(tmp_path):
    """The report's comparisons are the study's pairs of methods, not names: renamed, RankE is still compared."""
    renamed = replace(RANKE, name="co-evolved decoder")
    markdown, _ = _build(tmp_path / "report", [0, 1, 2], renamed)
    results = _section(markdown, "Results")
    assert "co-evolved decoder - GRPO, paired by seed (ema vs base decoder):" in results
    fd_row = next(line for line in results.splitlines() if line.startswith("| FD (toy features) |"))
    assert fd_row.endswith("| -3.0 [-5.5, -0.5] | 3 | co-evolved decoder lower FD (better) |")
    assert "RankE" not in results
    assert markdown.startswith("# RankE in the toy world: GRPO vs co-evolved decoder\n")


def test_a_study_refuses_a_comparison_of_a_method_it_lacks():
    with pytest.raises(ValueError, match=r"comparison 'RankE' - 'GRPO' names 'RankE', not a method of the study \(GRPO\)"):
        Study((GRPO,), ((RANKE, GRPO),))
    with pytest.raises(ValueError, match="repeated: GRPO"):
        Study((GRPO, replace(RANKE, name="GRPO")))
    with pytest.raises(ValueError, match="the study compares RankE, but no runs of it were given"):
        GRPO_VS_RANKE.compared([Method(GRPO, [])])


def _page(markdown: str, folder) -> BeautifulSoup:
    return BeautifulSoup(render_html("a <page>", markdown, folder), "html.parser")


def test_page_wraps_tables_and_labels_every_cell_with_its_column(tmp_path):
    markdown = "| metric | A - B [95% interval] | `code` & more |\n|---|---|---|\n| FD | -3.0 [-5.5, -0.5] | x |\n| KID | +0.1 | y |\n"
    page = _page(markdown, tmp_path)
    assert page.title.string == "a <page>"
    table = page.select_one("div.table > table")
    assert [th.get_text() for th in table.select("thead th")] == ["metric", "A - B [95% interval]", "code & more"]
    rows = [[(td["data-label"], td.get_text()) for td in row.find_all("td")] for row in table.select("tbody tr")]
    assert rows == [
        [("metric", "FD"), ("A - B [95% interval]", "-3.0 [-5.5, -0.5]"), ("code & more", "x")],
        [("metric", "KID"), ("A - B [95% interval]", "+0.1"), ("code & more", "y")],
    ]


def test_page_inlines_images_and_groups_consecutive_ones_into_figures(tmp_path):
    for name, seed in (("a.png", 1), ("b.png", 2)):
        save_image_grid(_images(seed), tmp_path / name, nrow=4)
    page = _page("![first plot](a.png)\n![second plot](b.png)\n\n![alone](b.png)\n\nText with ![an icon](a.png) inside.\n", tmp_path)
    grid, single = page.select("div.figures")
    assert grid["class"] == ["figures"] and single["class"] == ["figures", "single"]
    assert [figure.figcaption.get_text() for figure in grid.find_all("figure")] == ["first plot", "second plot"]
    assert [figure.img["alt"] for figure in grid.find_all("figure")] == ["first plot", "second plot"]
    assert [figure.figcaption.get_text() for figure in single.find_all("figure")] == ["alone"]
    sources = [img["src"] for img in page.find_all("img")]
    assert len(sources) == 4 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (tmp_path / "a.png").read_bytes()
    assert base64.b64decode(sources[2].split(",", 1)[1]) == (tmp_path / "b.png").read_bytes()
    inline = page.find_all("p")[-1]  # an image within text stays in its paragraph (inlined, no figure)
    assert inline.img["alt"] == "an icon" and inline.find("figure") is None and "Text with" in inline.get_text()


def test_page_renders_code_lists_and_escapes_text(tmp_path):
    markdown = ("Intro of **bf16** in `code <x>`.\n\n```\nranke posttrain --out <dir> & more\n```\nAfter the block.\n\n"
                "* one `item`\n* two\n\nA < b & c, <script>alert(1)</script> stays text.\n")  # fmt: skip
    html = render_html("title", markdown, tmp_path)
    page = BeautifulSoup(html, "html.parser")
    assert page.pre.code.get_text() == "ranke posttrain --out <dir> & more\n"
    assert "<pre><code>ranke posttrain --out &lt;dir&gt; &amp; more" in html
    first, after, *_, last = page.find_all("p")
    assert first.strong.get_text() == "bf16" and first.code.get_text() == "code <x>"
    assert after.get_text() == "After the block."
    assert [li.get_text() for li in page.ul.find_all("li")] == ["one item", "two"] and page.ul.li.code.get_text() == "item"
    assert page.find("script") is None and last.get_text() == "A < b & c, <script>alert(1)</script> stays text."
    assert "A &lt; b &amp; c, &lt;script&gt;" in html


def test_a_study_of_two_levels_draws_a_plane_per_level_and_the_mechanism_of_the_higher(tmp_path):
    """`ranke demo --full`'s shape: GRPO and RankE at two pressure levels, each level its own
    reward-fidelity plane and matched-gain table; the adapted decoder's runs, which start from the
    higher level's GRPO policies, are left out of the plane and make the mechanism figure."""
    out = tmp_path / "report"
    _build(out, [0, 1])
    study = PRESETS["full"].study()
    methods = []
    for spec in study.methods:
        runs = []
        for seed in (0, 1):
            run = out / "runs" / f"{spec.name.replace(': ', '_').replace(' ', '_')}_seed{seed}"
            fd, reward = FINAL_FD[seed][spec.decoder != "base"], FINAL_REWARD[seed][spec.decoder != "base"]
            _write_run(run, seed, list(spec.decoders), fd + (3.0 if spec.group == "colorful" else 0.0), reward)
            runs.append(run)
        methods.append(Method(spec, runs))
    adapted = methods[-1]
    mechanism = {run.name: {"method": adapted.name, "recon_fd": 27.0} for run in adapted.runs}
    markdown = build_report(out, SFT | {"recon_fd": 27.8}, study, methods, "full", RunConfig().posttrain, [0, 1], [], 0.5,
                            mechanism)[0].read_text()  # fmt: skip
    frontier = _section(markdown, "Reward against fidelity")
    assert frontier.index("**Level `clip`** (the preset's reward)") < frontier.index("**Level `colorful`** (rewards=")
    assert "](frontier_clip.png)" in frontier and "](frontier_colorful.png)" in frontier
    assert (out / "frontier_clip.png").is_file() and (out / "frontier_colorful.png").is_file()
    # one matched-gain table per level, each comparing that level's RankE with its GRPO
    tables = [line for line in frontier.splitlines() if "| FD |" in line]
    assert [row.split(" | ")[0] for row in tables] == ["| clip: RankE - clip: GRPO", "| colorful: RankE - colorful: GRPO"]
    assert "adapted decoder" not in frontier
    results = _section(markdown, "Results")
    assert "](mechanism_colorful.png)" in results and (out / "mechanism_colorful.png").is_file()
    # seeds 0, 1: frozen (colorful GRPO) FD 51, 50, adapted 49, 47: gains 2, 3 -> 2.5 +- t(0.975, 1) * 0.707 / sqrt(2)
    # = 6.35; real codes 27.8 -> 27.0: 0.8 each; specific 1.2, 2.2 -> 1.7 +- 6.35
    assert "| on the policy's tokens (frozen - adapted) | +2.5 [-3.9, +8.9] | 2 |" in results
    assert "| on the real images' codes (base - adapted) | +0.8 [+0.8, +0.8] | 2 |" in results
    assert "| specific to the policy's tokens (the first - the second) | +1.7 [-4.7, +8.1] | 2 |" in results
    assert "Each method runs at every level of optimisation pressure: `clip`: the preset's reward; `colorful`: rewards=" in markdown
    assert markdown.startswith("# RankE in the toy world: GRPO vs RankE\n")  # levels, ablations and mechanism runs left out


def test_a_study_of_more_than_two_methods_names_them_all_in_its_title():
    assert report_title(POLICY_FAMILY) == "GRPO, DAPO, VA-π and VA-π + RankE decoder"
    assert report_title(PRESETS["ablations"].study()) == "GRPO vs RankE"
