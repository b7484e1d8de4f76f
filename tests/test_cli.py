"""The command line as a user meets it: exit codes, one-line errors, files written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ranke.cli import main
from ranke.runtime import UserError

LAYOUTS = "tests/data/llamagen_layouts.json"


def run_cli(capsys, *argv):
    code = 0
    try:
        main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def official_file(tmp_path, name, layout, change=None):
    state = {key: torch.zeros(shape) for key, shape in layout}
    if change:
        state[change[0]] = torch.zeros(change[1])
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def layouts():
    with open(LAYOUTS) as f:
        return json.load(f)


def test_check_checkpoint_accepts_official_vq16_layout(tmp_path, capsys, layouts):
    path = official_file(tmp_path, "vq.pt", layouts["VQ-16"])
    code, out, _ = run_cli(capsys, "check-checkpoint", "--kind", "vq", "--preset", "VQ-16", str(path))
    assert code == 0
    assert out.strip() == "ok 344 tensors"


def test_check_checkpoint_names_the_wrong_shape(tmp_path, capsys, layouts):
    path = official_file(tmp_path, "gpt.pt", layouts["GPT-B"], change=("layers.3.attention.wo.weight", (768, 700)))
    code, out, _ = run_cli(capsys, "check-checkpoint", "--kind", "gpt", "--preset", "GPT-B", str(path))
    assert code == 2
    assert "wrong shape: layers.3.attention.wo.weight expected [768, 768] found [768, 700]" in out


def test_check_checkpoint_garbage_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    code, out, err = run_cli(capsys, "check-checkpoint", "--kind", "vq", "--preset", "VQ-16", str(path))
    assert code == 2
    assert err.startswith("ranke: error:") and len(err.strip().splitlines()) == 1


def test_unknown_preset_lists_choices(tmp_path, capsys):
    code, _, err = run_cli(capsys, "check-checkpoint", "--kind", "gpt", "--preset", "GPT-Z", str(tmp_path / "x.pt"))
    assert code == 2 and "GPT-XL" in err


def test_toy_sample_then_verify(tmp_path, capsys):
    out_dir = tmp_path / "toy"
    code, _, _ = run_cli(capsys, "toy", "sample", "--n", "40", "--out", str(out_dir), "--split", "heldout")
    assert code == 0
    assert len(list(out_dir.glob("*.png"))) == 40
    code, out, _ = run_cli(capsys, "toy", "verify", str(out_dir))
    report = json.loads(out)
    assert code == 0 and report["n"] == 40 and report["accuracy"] == 1.0


def test_unknown_config_key_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-tokenizer", "--out", str(tmp_path / "r"), "stpes=3")
    assert code == 2
    assert err.strip() == "ranke: error: unknown config key 'stpes' (did you mean 'steps'?)"


def test_fid_of_toy_folders(tmp_path, capsys):
    """Real vs real (another rendering of the same prompts) is far below real vs blurred copies."""
    from PIL import Image, ImageFilter

    real_a, real_b, blurred = tmp_path / "a", tmp_path / "b", tmp_path / "blurred"
    run_cli(capsys, "toy", "sample", "--n", "60", "--out", str(real_a), "--split", "heldout", "--seed", "1")
    run_cli(capsys, "toy", "sample", "--n", "60", "--out", str(real_b), "--split", "heldout", "--seed", "2")
    blurred.mkdir()
    for path in sorted(real_b.glob("*.png")):
        Image.open(path).filter(ImageFilter.GaussianBlur(2)).save(blurred / path.name)
    code, out, _ = run_cli(capsys, "fid", str(real_a), str(real_b))
    real = json.loads(out)
    assert code == 0 and real["n_a"] == 60 and real["n_b"] == 60 and real["features"] == "toy"
    code, out, _ = run_cli(capsys, "fid", str(real_a), str(blurred), "--batch-size", "7")
    assert code == 0 and json.loads(out)["fd"] > 3 * real["fd"]
    blurred_metrics = json.loads(out)
    code, out, _ = run_cli(capsys, "fid", str(real_a), str(real_a))
    same = json.loads(out)
    assert abs(same["fd"]) < 1e-6 * real["fd"]
    # a set against itself: every image in its own ball and its 5 neighbours' -> density (k + 1) / k
    assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0) and same["density"] == pytest.approx(1.2)
    assert real["nearest_k"] == 5 and real["manifold_n_a"] == real["manifold_n_b"] == 60
    # blurred copies sit off the dense part of the real manifold (60 images each: density 1.05 -> 0.50)
    assert blurred_metrics["density"] < 0.6 * real["density"] and blurred_metrics["precision"] <= real["precision"]


def test_fid_inception_without_weights_is_one_line(tmp_path, capsys, monkeypatch):
    from ranke.eval import inception

    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    code, _, err = run_cli(capsys, "fid", str(tmp_path), str(tmp_path), "--features", "inception",
                           "--inception-weights", str(tmp_path / "none.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Inception weights not found" in err or "clean-fid, which is not installed" in err


def test_eval_writes_metrics_table_and_grid(tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code, out, _ = run_cli(capsys, "eval", "--out", str(out_dir), "--n", "6", "--batch-size", "4", "--cfg", "2.0")
    assert code == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics == json.loads(out)
    for key in ("reward", "clip_score", "fd", "verifier_accuracy", "token_kl", "token_entropy"):
        assert isinstance(metrics[key], float)
    assert metrics["n"] == 6 and metrics["cfg_scale"] == 2.0 and metrics["decoder"] == "online"
    table = (out_dir / "metrics.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| committed toy assets (policy online, decoder online, cfg 2) | 6 |")
    assert (out_dir / "samples.png").is_file()


def test_ema_of_committed_assets_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--out", str(tmp_path), "--n", "4", "--policy", "ema")
    assert code == 2 and "no EMA copies" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "train-reward", "--out", str(tmp_path / "r"), "reward.models=[clip]")
    assert code == 2 and "reward.models must list some of reward_clip, eval_clip, features" in err


def test_a_value_error_from_the_library_is_one_line_naming_where_and_debug_shows_it(tmp_path, capsys, monkeypatch):
    """tau = 0 reaches the pure rank weights (ranke/algo), which raise ValueError: one line with
    exit 2 that names the raising line; with --debug the exception itself propagates. (The config's
    range table refuses tau = 0 first, tests/test_bad_inputs.py; it is set aside here so that the
    value reaches the pure code.)"""
    from ranke import domains

    monkeypatch.setattr(domains, "DOMAINS", [(key, rule) for key, rule in domains.DOMAINS if "tau" not in key])
    tiny = ["mode=decoder", "steps=1", "prompts_per_step=2", "group_size=2", "grid_prompts=2", "eval_samples=0"]
    argv = ["posttrain", "--out", str(tmp_path / "run"), *tiny, "tau_start=0", "tau_end=0"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "rank temperature tau must be > 0" in err and "ValueError at ranke/algo/decoder.py:" in err
    with pytest.raises(ValueError, match="rank temperature tau must be > 0"):
        main(["--debug", "posttrain", "--out", str(tmp_path / "debug"), *tiny, "tau_start=0", "tau_end=0"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_on_the_line_shows_the_traceback(tmp_path, capsys, where):
    command = ["sample", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match="missing.txt' not found"):
        main(["--debug", *command] if where == "before" else [*command, "--debug"])
    code, _, err = run_cli(capsys, *command)
    assert code == 2 and err.strip() == f"ranke: error: prompt file '{tmp_path / 'missing.txt'}' not found"


def test_debug_after_a_nested_command(capsys):
    with pytest.raises(UserError, match="not found"):
        main(["toy", "verify", "no/such/folder", "--debug"])


def _pngs(folder) -> list:
    return [np.array(Image.open(path)) for path in sorted(folder.glob("*.png"))]


def test_sample_takes_sampling_overrides(tmp_path, capsys):
    """top_k=1 samples the most likely token at every position: two seeds draw the same images,
    which they do not with the preset's top-k."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle\na small blue square\n")
    folders = {}
    for name, overrides in (("greedy", ["sampling.top_k=1"]), ("preset", [])):
        for seed in ("1", "2"):
            out = tmp_path / f"{name}{seed}"
            code, printed, _ = run_cli(capsys, "sample", "--prompts", str(prompts), "--out", str(out), "--seed", seed,
                                       *overrides)  # fmt: skip
            assert code == 0 and json.loads(printed)["n"] == 2
            folders[name + seed] = _pngs(out)
    assert all(np.array_equal(a, b) for a, b in zip(folders["greedy1"], folders["greedy2"], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(folders["preset1"], folders["preset2"], strict=True))


def test_eval_takes_sampling_overrides(tmp_path, capsys):
    runs = {}
    for seed in ("0", "1"):
        code, printed, _ = run_cli(capsys, "eval", "--out", str(tmp_path / seed), "--n", "6", "--batch-size", "4",
                                   "--seed", seed, "sampling.top_k=1", "sampling.cfg_scale=2.5")  # fmt: skip
        assert code == 0
        runs[seed] = json.loads(printed)
    assert runs["0"]["cfg_scale"] == 2.5
    for key in ("reward", "clip_score", "fd", "token_kl"):  # greedy sampling: the seed changes nothing
        assert runs["0"][key] == runs["1"][key], key


@pytest.mark.parametrize(
    "command, message",
    [
        (["eval", "--clip-path", "clip"], "--clip-path does not apply to --protocol toy (only to coco30k and geneval)"),
        (["eval", "--features", "toy"], "--features does not apply to --protocol toy (only to coco30k)"),
        (["eval", "--hpsv2-path", "h.pt"], "--hpsv2-path does not apply to --protocol toy (only to hpsv2)"),
        (["eval", "--backbone", "llamagen"], "--backbone does not apply to --protocol toy (only to coco30k, hpsv2 and geneval)"),
        (["eval", "--protocol", "hpsv2", "--n", "5"], "--n does not apply to --protocol hpsv2 (only to toy and coco30k)"),
        (["eval", "--protocol", "hpsv2", "--ref-dir", "coco"], "--ref-dir does not apply to --protocol hpsv2"),
        (["eval", "--protocol", "coco30k", "--prompts-dir", "p"], "--prompts-dir does not apply to --protocol coco30k"),
        (["eval", "sampling.top_kk=0"], "unknown config key 'sampling.top_kk' (did you mean 'top_k'?)"),
        (["eval", "--cfg", "2", "sampling.cfg_scale=3"], "sampling.cfg_scale is set twice, by --cfg and by"),
        (["sample", "--prompts", "p.txt", "--backbone", "janus", "backbone.kind=llamagen"], "backbone.kind is set twice"),
    ],
)
def test_options_that_do_not_apply_are_one_line_errors(tmp_path, capsys, command, message):
    code, _, err = run_cli(capsys, *command, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("ranke: error: " + message)
    assert not (tmp_path / "out").exists()
