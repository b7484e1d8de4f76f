"""The command line as a user meets it: exit codes, one-line errors, files written."""

import json

import pytest
import torch

from ranke.cli import main

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
