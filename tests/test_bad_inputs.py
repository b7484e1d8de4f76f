"""Every bad input a user can give, across the commands: exit code 2, one line on stderr naming
the problem, no traceback, and the existing run, sample folder and inputs left byte for byte as
they were. The commands run in-process (`ranke.cli.main`); each case fails before any long work."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_posttrain import LORA, TINY
from test_user_rewards import BROKEN as BROKEN_REWARDS

from ranke.cli import main
from ranke.toy.data import ToyConfig, heldout_prompts

LATIN1 = "a small red circle caf\u00e9\n".encode("latin-1")  # not UTF-8
RUN_SETTINGS = [*TINY, "mode=both", "steps=1", "disc_start=0", "grid_every=100"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> Iterator[dict[str, Path]]:
    """A finished post-training run, a sample folder, and input files good and bad."""
    root = tmp_path_factory.mktemp("world")
    paths = {"root": root, "run": root / "run", "samples": root / "samples", "new": root / "new"}
    main(["posttrain", "--out", str(paths["run"]), *RUN_SETTINGS])
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(heldout_prompts(ToyConfig())[:2]) + "\n")
    paths["prompts"] = prompts
    main(["sample", "--prompts", str(prompts), "--out", str(paths["samples"])])

    inputs = root / "inputs"
    inputs.mkdir()
    for name in ("latin1.txt", "latin1.yaml", "latin1.json"):
        (inputs / name).write_bytes(LATIN1)
    (inputs / "file").write_text("a file, not a folder\n")
    (inputs / "geneval.jsonl").write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                                      "prompt": "a red circle"}) + "\n")  # fmt: skip
    verify = inputs / "verify"
    verify.mkdir()
    (verify / "captions.jsonl").write_bytes(b'{"file": "00000.png", "caption": "caf\xe9"}\n')
    images = inputs / "images"
    images.mkdir()
    for index in range(6):  # the fewest `ranke fid` takes (5 nearest neighbours of each image)
        Image.fromarray(np.full((16, 16, 3), 40 * index, np.uint8)).save(images / f"{index:05d}.png")
    few = inputs / "few"
    few.mkdir()
    for index in range(2):
        shutil.copy(images / f"{index:05d}.png", few)
    truncated = inputs / "truncated"
    shutil.copytree(images, truncated)
    png = (truncated / "00001.png").read_bytes()
    (truncated / "00001.png").write_bytes(png[: len(png) // 2])
    not_images = inputs / "not_images"
    shutil.copytree(images, not_images)
    (not_images / "00002.png").write_text("not a PNG")
    sizes = inputs / "sizes"
    shutil.copytree(images, sizes)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(sizes / "00003.png")
    with open(inputs / "pickled.pt", "wb") as handle:
        pickle.dump({"model": {"w": [1, 2]}, "args": Path("x")}, handle)
    (inputs / "ranke_broken_rewards.py").write_text(BROKEN_REWARDS)  # the broken rewards of test_user_rewards
    sys.path.insert(0, str(inputs))  # a user's reward module outside the package
    paths["inputs"] = inputs
    yield paths
    sys.path.remove(str(inputs))
    sys.modules.pop("ranke_broken_rewards", None)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` except the places the cases may create (`new`)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).parts[0] != "new"
    }


# (case id, argv with {placeholders} from the world fixture, a piece of the expected message)
CASES = [
    # numeric settings outside their domain
    ("lr_nan", ["posttrain", "--out", "{new}/a", "policy_lr=nan"], "'posttrain.policy_lr' is nan; allowed: a finite number > 0"),
    ("lr_negative", ["posttrain", "--out", "{new}/a", "policy_lr=-1e-4"], "'posttrain.policy_lr' is -0.0001"),
    ("lr_inf", ["posttrain", "--out", "{new}/a", "decoder_lr=.inf"], "'posttrain.decoder_lr' is inf"),
    ("lr_zero", ["posttrain", "--out", "{new}/a", "disc_lr=0"], "'posttrain.disc_lr' is 0.0"),
    ("save_every_0", ["posttrain", "--out", "{new}/a", "save_every=0"], "'posttrain.save_every' is 0; allowed: a finite number >= 1"),
    ("log_every_0", ["posttrain", "--out", "{new}/a", "log_every=0"], "'posttrain.log_every' is 0"),
    ("grid_every_0", ["posttrain", "--out", "{new}/a", "grid_every=0"], "'posttrain.grid_every' is 0"),
    ("keep_negative", ["posttrain", "--out", "{new}/a", "keep_checkpoints=-1"], "'posttrain.keep_checkpoints' is -1; allowed: a finite number >= 0"),
    ("ema_decay_above_1", ["posttrain", "--out", "{new}/a", "policy_ema_decay=1.5"], "'posttrain.policy_ema_decay' is 1.5; allowed: a number in [0, 1]"),
    ("ema_decay_negative", ["posttrain", "--out", "{new}/a", "decoder_ema_decay=-0.1"], "'posttrain.decoder_ema_decay' is -0.1"),
    ("prompts_per_step_0", ["posttrain", "--out", "{new}/a", "prompts_per_step=0"], "'posttrain.prompts_per_step' is 0"),
    ("group_size_1", ["posttrain", "--out", "{new}/a", "group_size=1"], "'posttrain.group_size' is 1; allowed: a finite number >= 2"),
    ("clip_eps_0", ["posttrain", "--out", "{new}/a", "clip_eps=0"], "'posttrain.clip_eps' is 0.0; allowed: a number in (0, 1)"),
    ("pixel_context_noise_above_1", ["posttrain", "--out", "{new}/a", "mode=pixel", "pixel_context_noise=1.5"], "'posttrain.pixel_context_noise' is 1.5; allowed: a number in [0, 1]"),
    ("pixel_distance_unknown", ["posttrain", "--out", "{new}/a", "mode=pixel", "pixel_distance=lpips"], "'posttrain.pixel_distance' is 'lpips'; allowed: one of l1, l2"),
    ("pixel_weight_negative", ["posttrain", "--out", "{new}/a", "mode=pixel", "pixel_weight=-1"], "'posttrain.pixel_weight' is -1.0; allowed: a finite number >= 0"),
    ("pixel_perceptual_weight_nan", ["posttrain", "--out", "{new}/a", "mode=pixel", "pixel_perceptual_weight=nan"], "'posttrain.pixel_perceptual_weight' is nan"),
    ("likelihood_weight_negative", ["posttrain", "--out", "{new}/a", "mode=pixel", "likelihood_weight=-0.1"], "'posttrain.likelihood_weight' is -0.1; allowed: a finite number >= 0"),
    ("pixel_soft_token", ["posttrain", "--out", "{new}/a", "mode=pixel_and_decoder", "soft_token_weight=0.5"], "L_soft is not defined on the pixel modes' teacher-forced predictions"),
    ("grad_clip_0", ["posttrain", "--out", "{new}/a", "grad_clip=0"], "'posttrain.grad_clip' is 0.0"),
    ("tau_0", ["posttrain", "--out", "{new}/a", "tau_end=0"], "'posttrain.tau_end' is 0.0"),
    ("rank_top_k_0", ["posttrain", "--out", "{new}/a", "rank_top_k=0"], "'posttrain.rank_top_k' is 0"),
    ("rank_top_k_above_group", ["posttrain", "--out", "{new}/a", "rank_top_k=9"], "rank_top_k=9 must be between 1 and group_size=8"),
    ("stop_signal_unknown", ["posttrain", "--out", "{new}/a", "stop_signals=[SIGTERM, SIGFOO]"], "stop_signals: 'SIGFOO' is not a signal"),
    ("stop_signal_kill", ["sft", "--out", "{new}/a", "stop_signals=[SIGKILL]"], "stop_signals: 'SIGKILL' is not a signal a process can handle"),
    ("collective_timeout_0", ["posttrain", "--out", "{new}/a", "collective_timeout=0"], "'collective_timeout' is 0.0; allowed: a finite number > 0"),
    ("skips_negative", ["posttrain", "--out", "{new}/a", "max_consecutive_skips=-1"], "'max_consecutive_skips' is -1"),
    ("temperature_0", ["posttrain", "--out", "{new}/a", "sampling.temperature=0"], "'sampling.temperature' is 0.0"),
    ("top_p_0", ["posttrain", "--out", "{new}/a", "sampling.top_p=0"], "'sampling.top_p' is 0.0; allowed: a number in (0, 1]"),
    ("seed_negative", ["posttrain", "--out", "{new}/a", "seed=-1"], "'seed' is -1"),
    ("loss_weight_negative", ["posttrain", "--out", "{new}/a", "consistency_weight=-1"], "'posttrain.consistency_weight' is -1.0"),
    ("sft_batch_0", ["sft", "--out", "{new}/a", "batch_size=0"], "'sft.batch_size' is 0"),
    ("sft_lr_nan", ["sft", "--out", "{new}/a", "lr=nan"], "'sft.lr' is nan"),
    ("sft_betas", ["sft", "--out", "{new}/a", "betas=[0.9, 1.5]"], "'sft.betas[1]' is 1.5; allowed: a number in [0, 1)"),
    ("gpt_dim_0", ["sft", "--out", "{new}/a", "gpt.dim=0"], "'gpt.dim' is 0"),
    ("tokenizer_steps_0", ["train-tokenizer", "--out", "{new}/a", "steps=0"], "'tokenizer.steps' is 0"),
    ("tokenizer_ratio", ["train-tokenizer", "--out", "{new}/a", "min_lr_ratio=2"], "'tokenizer.min_lr_ratio' is 2.0"),
    ("reward_steps_0", ["train-reward", "--out", "{new}/a", "reward.features.steps=0"], "'reward.features.steps' is 0"),
    ("reward_lr_negative", ["train-reward", "--out", "{new}/a", "reward.reward_clip.lr=-1"], "'reward.reward_clip.lr' is -1.0"),
    ("steps_not_int", ["posttrain", "--out", "{new}/a", "steps=abc"], "config key 'posttrain.steps' must be int"),
    # a LoRA adapter on the policy (docs/posttrain.md "How do I train a LoRA adapter?")
    ("lora_rank_0", ["posttrain", "--out", "{new}/a", "posttrain.lora.rank=0"], "'posttrain.lora.rank' is 0; allowed: a finite number >= 1"),
    ("lora_alpha_0", ["posttrain", "--out", "{new}/a", "posttrain.lora.alpha=0"], "'posttrain.lora.alpha' is 0.0; allowed: a finite number > 0"),
    ("lora_dropout", ["posttrain", "--out", "{new}/a", "posttrain.lora.dropout=1.5"], "'posttrain.lora.dropout' is 1.5; allowed: a number in [0, 1]"),
    ("lora_target", ["posttrain", "--out", "{new}/a", *TINY, *LORA, "posttrain.lora.target_modules=[wqkv, q_proj]"],
     "LoRA target_modules ['q_proj'] name no linear layer of the policy; its linear layers are: fc1, fc2, output, w1, w2, w3, wo, wqkv"),
    ("lora_decoder_mode", ["posttrain", "--out", "{new}/a", *LORA, "mode=decoder"], "mode=decoder has none (use policy or both)"),
    ("lora_reference_ema", ["posttrain", "--out", "{new}/a", *LORA, "reference=ema"], "set posttrain.reference=frozen"),
    # the user's own rewards (docs/posttrain.md "How do I bring my own reward?")
    ("user_reward_not_importable", ["posttrain", "--out", "{new}/a", "rewards={{no_such_module_xyz:score: 1.0}}"],
     "reward 'no_such_module_xyz:score': module 'no_such_module_xyz' cannot be imported"),
    ("user_reward_missing", ["posttrain", "--out", "{new}/a", "rewards={{ranke_broken_rewards:missing: 1.0}}"], "has no attribute 'missing'"),
    ("user_reward_wrong_shape", ["posttrain", "--out", "{new}/a", *TINY, "rewards={{ranke_broken_rewards:wrong_shape: 1.0}}"],
     "reward 'ranke_broken_rewards:wrong_shape' returned shape (2, 1), expected (2,)"),
    ("user_reward_nan", ["posttrain", "--out", "{new}/a", *TINY, "rewards={{toy_clip: 1.0, ranke_broken_rewards:nan: 1.0}}"],
     "reward 'ranke_broken_rewards:nan' returned 2 non-finite score(s)"),
    ("user_reward_raises", ["posttrain", "--out", "{new}/a", *TINY, "rewards={{ranke_broken_rewards:raises: 1.0}}"],
     "reward 'ranke_broken_rewards:raises' raised RuntimeError: the scorer fell over"),
    # a config that records objects given from Python (ranke.api), which the command line cannot give
    ("reward_object_from_cli", ["posttrain", "--out", "{new}/a", "rewards={{red: 1.0}}", "objects.rewards={{red: mine.red}}"],
     "the config records reward 'red' (mine.red) given as a Python object, which the command line cannot give"),
    ("prompts_object_from_cli", ["posttrain", "--out", "{new}/a", "objects.prompts=a list"],
     "the config records prompts (a list) given as a Python object"),
    ("reward_object_without_weight", ["posttrain", "--out", "{new}/a", "objects.rewards={{red: mine.red}}"],
     "the reward object 'red' has no weight: name it in posttrain.rewards"),
    ("demo_user_reward_not_importable", ["demo", "--out", "{new}/a", "--quick", "rewards={{no_such_module_xyz:score: 1.0}}"],
     "module 'no_such_module_xyz' cannot be imported"),
    # text inputs that are not UTF-8
    ("yaml_latin1", ["posttrain", "--config", "{inputs}/latin1.yaml", "--out", "{new}/a"], "latin1.yaml' is not UTF-8 text"),
    ("prompts_latin1", ["sample", "--prompts", "{inputs}/latin1.txt", "--out", "{new}/a"], "latin1.txt' is not UTF-8 text"),
    ("posttrain_prompts_latin1", ["posttrain", "--out", "{new}/a", *TINY, "prompts={inputs}/latin1.txt"], "latin1.txt' is not UTF-8"),
    ("captions_latin1", ["toy", "verify", "{inputs}/verify"], "captions.jsonl' is not UTF-8 text"),
    ("coco_captions_latin1", ["eval", "--protocol", "coco30k", "--captions", "{inputs}/latin1.json", "--ref-dir",
                              "{inputs}/images", "--out", "{new}/a"], "latin1.json' is not UTF-8 text"),
    # output folders that cannot be one
    ("posttrain_out_file", ["posttrain", "--out", "{inputs}/file", *TINY], "'{inputs}/file' is an existing file"),
    ("tokenizer_out_under_file", ["train-tokenizer", "--out", "{inputs}/file/run"], "cannot be created"),
    ("sample_out_file", ["sample", "--prompts", "{prompts}", "--out", "{inputs}/file"], "is an existing file"),
    ("toy_sample_out_file", ["toy", "sample", "--n", "2", "--out", "{inputs}/file"], "is an existing file"),
    ("eval_out_file", ["eval", "--n", "2", "--out", "{inputs}/file"], "is an existing file"),
    ("demo_out_file", ["demo", "--out", "{inputs}/file", "--quick"], "--out '{inputs}/file' is an existing file, not a folder"),
    # images for ranke fid
    ("fid_truncated", ["fid", "{inputs}/truncated", "{inputs}/images"], "00001.png' cannot be read"),
    ("fid_not_an_image", ["fid", "{inputs}/images", "{inputs}/not_images"], "00002.png' cannot be read"),
    ("fid_sizes", ["fid", "{inputs}/sizes", "{inputs}/images"], "have different sizes"),
    ("fid_size_0", ["fid", "{inputs}/images", "{inputs}/images", "--size", "0"], "--size must be a positive"),
    ("fid_batch_0", ["fid", "{inputs}/images", "{inputs}/images", "--batch-size", "0"], "--batch-size must be positive"),
    ("fid_missing", ["fid", "{inputs}/missing", "{inputs}/images"], "image folder '{inputs}/missing' not found"),
    ("fid_too_few", ["fid", "{inputs}/images", "{inputs}/few"], "'{inputs}/few' holds 2 images; the Frechet distance and "
                    "precision / recall (5 nearest neighbours) need at least 6 per side"),
    # sampling and evaluation settings
    ("sample_cfg_nan", ["sample", "--prompts", "{prompts}", "--out", "{new}/a", "--cfg", "nan"], "'sampling.cfg_scale' is nan"),
    ("sample_cfg_negative", ["sample", "--prompts", "{prompts}", "--out", "{new}/a", "--cfg", "-1"], "'sampling.cfg_scale' is -1.0"),
    ("sample_n_per_prompt_0", ["sample", "--prompts", "{prompts}", "--out", "{new}/a", "--n-per-prompt", "0"], "must be positive"),
    ("sample_ckpt_missing", ["sample", "--prompts", "{prompts}", "--out", "{new}/a", "--ckpt", "{inputs}/missing"], "missing' is not a policy file"),
    ("sample_reused_other_seed", ["sample", "--prompts", "{prompts}", "--out", "{samples}", "--seed", "7"], "holds samples made with other settings (seed differ)"),
    ("eval_n_0", ["eval", "--n", "0", "--out", "{new}/a"], "--n must be between 6 and"),
    ("eval_n_below_nearest_k", ["eval", "--n", "5", "--out", "{new}/a"], "--n must be between 6 and the 2000 heldout prompts (toy.heldout_size), got 5"),
    ("eval_cfg_nan", ["eval", "--cfg", "nan", "--out", "{new}/a"], "'sampling.cfg_scale' is nan"),
    ("coco_n_0", ["eval", "--protocol", "coco30k", "--captions", "{prompts}", "--ref-dir", "{inputs}/images", "--n", "0",
                  "--out", "{new}/a"], "n must be between 1 and 2, got 0"),
    # resuming a run
    ("no_resume", ["posttrain", "--out", "{run}", *RUN_SETTINGS], "already holds checkpoints; pass --resume"),
    ("resume_mode", ["posttrain", "--out", "{run}", "--resume", *RUN_SETTINGS, "steps=2", "mode=policy"], "--resume cannot change posttrain.mode"),
    ("resume_seed", ["posttrain", "--out", "{run}", "--resume", *RUN_SETTINGS, "steps=2", "seed=5"], "--resume cannot change seed"),
    ("resume_disc", ["posttrain", "--out", "{run}", "--resume", *RUN_SETTINGS, "steps=2", "disc_channels=32"], "cannot change posttrain.disc_channels"),
    ("resume_lora", ["posttrain", "--out", "{run}", "--resume", *RUN_SETTINGS, "steps=2", *LORA], "--resume cannot change posttrain.lora"),
    ("resume_lr_nan", ["posttrain", "--out", "{run}", "--resume", *RUN_SETTINGS, "policy_lr=nan"], "'posttrain.policy_lr' is nan"),
    # checkpoint files
    ("pickle_needs_trust", ["check-checkpoint", "--kind", "vq", "--preset", "toy", "{inputs}/pickled.pt"], "pass --trust-checkpoint"),
    ("checkpoint_missing", ["check-checkpoint", "--kind", "vq", "--preset", "toy", "{inputs}/none.pt"], "none.pt' not found"),
    # export and GenEval
    ("export_not_a_run", ["export", "{inputs}/images", "--format", "llamagen", "--out", "{new}/export"], "is neither a post-training run nor a checkpoint"),
    ("geneval_n_per_prompt_0", ["eval", "--protocol", "geneval", "--metadata", "{inputs}/geneval.jsonl", "--n-per-prompt", "0",
                                "--out", "{new}/a"], "--n-per-prompt and --batch-size must be positive"),
    ("geneval_no_metadata", ["eval", "--protocol", "geneval", "--out", "{new}/a"], "--protocol geneval needs --metadata"),
    ("geneval_metadata_not_utf8", ["eval", "--protocol", "geneval", "--metadata", "{inputs}/latin1.json", "--out", "{new}/a"], "not UTF-8"),
    ("overwrite_on_toy_eval", ["eval", "--overwrite", "--out", "{new}/a"], "--overwrite does not apply to --protocol toy"),
]  # fmt: skip


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capsys, argv, expected):
    fill = {name: str(path) for name, path in world.items()}
    before = snapshot(world["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([part.format(**fill) for part in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("ranke: error: ")
    assert expected.format(**fill) in err
    assert snapshot(world["root"]) == before


def test_the_table_covers_every_command():
    assert len(CASES) >= 40
    commands = {case[1][0] if case[1][0] != "toy" else " ".join(case[1][:2]) for case in CASES}
    assert commands >= {"posttrain", "sft", "train-tokenizer", "train-reward", "sample", "eval", "fid", "toy verify",
                        "toy sample", "check-checkpoint", "export", "demo"}  # fmt: skip
