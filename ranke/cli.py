"""`ranke <command>`: argument parsing only; every command calls into the library (the training
recipes through `ranke.api`, the functions a Python user calls).

Bad input raises `UserError` (or, from the pure library code, `ValueError`), printed as one line
with exit code 2 (`--debug` shows the traceback). A run stopped by a signal (`Stopped`) exits 75,
a process that lost another process of its job exits 69, each with one line (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from ranke.runlock import release_all
from ranke.runtime import EXIT_LOST_PROCESS, EXIT_STOPPED, SecondSignal, Stopped, UserError

FLAG_KEYS = {  # flags that set a config key -> that key
    "cfg": "sampling.cfg_scale",
    "backbone": "backbone.kind",
    "gpt_ckpt": "backbone.gpt_ckpt",
    "vq_ckpt": "backbone.vq_ckpt",
    "t5_path": "backbone.t5_path",
    "gpt_preset": "backbone.gpt_preset",
    "image_size": "backbone.image_size",
    "model_path": "backbone.model_path",
}

# `ranke eval` options that belong to some protocols only; given to another one, they are errors
EVAL_PROTOCOL_OPTIONS = {
    "n": ("toy", "coco30k"),
    "prompts_dir": ("hpsv2",),
    "hpsv2_path": ("hpsv2",),
    "captions": ("coco30k",),
    "ref_dir": ("coco30k",),
    "clip_path": ("coco30k", "geneval"),
    "metadata": ("geneval",),
    "n_per_prompt": ("geneval",),
    "detector": ("geneval",),
    "overwrite": ("coco30k", "hpsv2", "geneval"),
    "features": ("coco30k",),
    "inception_weights": ("coco30k",),
    # the toy judges score toy-world models only
    **{flag: ("coco30k", "hpsv2", "geneval") for flag, key in FLAG_KEYS.items() if key.startswith("backbone.")},
}


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="toy", help="YAML file or bundled preset name (default: toy)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/latest")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=2000")


def cmd_train_tokenizer(args) -> None:
    from ranke.api import train_tokenizer

    train_tokenizer(args.config, args.out, overrides=args.overrides, resume=args.resume)


def cmd_sft(args) -> None:
    from ranke.api import sft

    sft(args.config, args.out, overrides=args.overrides, resume=args.resume)


def cmd_posttrain(args) -> None:
    from ranke.api import posttrain

    posttrain(args.config, args.out, overrides=_overrides(args), resume=args.resume)


def cmd_build_toy_assets(args) -> None:
    from ranke.train.build_assets import build_toy_assets

    build_toy_assets(args.out, args.config, args.overrides, install=args.install)


def cmd_demo(args) -> None:
    from ranke.demo import run_demo

    preset = next((name for name in ("quick", "full", "ablations", "mechanism", "policies") if getattr(args, name)), "default")
    run_demo(args.out, preset, args.config, args.overrides, workers=args.workers)


def cmd_check_checkpoint(args) -> None:
    from ranke.backbones.llamagen import GPT_IGNORED_KEYS
    from ranke.models.gpt import GPT_PRESETS, Transformer
    from ranke.models.load import check_checkpoint_report
    from ranke.models.vq import VQ_PRESETS, VQModel

    presets, model_class = (VQ_PRESETS, VQModel) if args.kind == "vq" else (GPT_PRESETS, Transformer)
    if args.preset not in presets:
        raise UserError(f"unknown {args.kind} preset '{args.preset}' (one of: {', '.join(presets)})")
    ignore = GPT_IGNORED_KEYS if args.kind == "gpt" else ()
    ok, lines = check_checkpoint_report(
        args.file, lambda: model_class(presets[args.preset]), args.trust_checkpoint, ignore
    )
    print("\n".join(lines))
    if not ok:
        sys.exit(2)


def cmd_export(args) -> None:
    from ranke.export import export_checkpoint

    print(json.dumps(export_checkpoint(args.source, args.format, args.out, args.policy, args.decoder)))


def cmd_toy_sample(args) -> None:
    from ranke.toy.tools import write_samples

    write_samples(args.n, args.out, split=args.split, seed=args.seed)
    print(f"wrote {args.n} images and captions.jsonl to {args.out}")


def cmd_toy_verify(args) -> None:
    from ranke.toy.tools import verify_dir

    print(json.dumps(verify_dir(args.dir)))


def cmd_sample(args) -> None:
    from ranke.sample_folder import sample_prompts_to_dir

    summary = sample_prompts_to_dir(
        out_dir=args.out, model=_model_choice(args), prompts_file=args.prompts,
        **_given(args, "seed", "n_per_prompt", "batch_size", "overwrite"),
    )  # fmt: skip
    print(json.dumps(summary))


def cmd_train_judges(args) -> None:
    from ranke.api import train_reward

    train_reward(args.config, args.out, overrides=args.overrides)


def cmd_fid(args) -> None:
    from ranke.eval.fid import folder_distance

    result = folder_distance(
        args.dir_a, args.dir_b, args.features, args.inception_weights, args.size, args.batch_size
    )
    print(json.dumps(result))


def cmd_eval(args) -> None:
    for option, protocols in EVAL_PROTOCOL_OPTIONS.items():
        if getattr(args, option) is not None and args.protocol not in protocols:
            flag = option.replace("_", "-")
            others = protocols[0] if len(protocols) == 1 else f"{', '.join(protocols[:-1])} and {protocols[-1]}"
            raise UserError(f"--{flag} does not apply to --protocol {args.protocol} (only to {others})")
    model = _model_choice(args)
    if args.protocol == "hpsv2":
        from ranke.eval.prompt_set import evaluate_hpsv2_benchmark

        if not args.prompts_dir or not args.hpsv2_path:
            raise UserError("--protocol hpsv2 needs --prompts-dir (HPDv2 benchmark prompts) and --hpsv2-path")
        metrics = evaluate_hpsv2_benchmark(
            prompts_dir=args.prompts_dir, hpsv2_path=args.hpsv2_path, out_dir=args.out, model=model,
            **_given(args, "seed", "batch_size", "overwrite"),
        )  # fmt: skip
    elif args.protocol == "coco30k":
        from ranke.eval.prompt_set import evaluate_prompt_set

        if not args.captions or not args.ref_dir:
            raise UserError("--protocol coco30k needs --captions (COCO captions JSON or a prompt file) and --ref-dir")
        metrics = evaluate_prompt_set(
            captions=args.captions, ref_dir=args.ref_dir, out_dir=args.out, model=model,
            **_given(args, "n", "seed", "features", "inception_weights", "clip_path", "batch_size", "overwrite"),
        )  # fmt: skip
    elif args.protocol == "geneval":
        from ranke.eval.geneval import evaluate_geneval

        if not args.metadata:
            raise UserError("--protocol geneval needs --metadata (GenEval's prompts/evaluation_metadata.jsonl)")
        metrics = evaluate_geneval(
            metadata=args.metadata, out_dir=args.out, model=model, detector_path=args.detector,
            clip_path=args.clip_path, **_given(args, "n_per_prompt", "seed", "batch_size", "overwrite"),
        )  # fmt: skip
    else:
        from ranke.eval.evaluate import evaluate_to_dir

        metrics = evaluate_to_dir(out_dir=args.out, model=model, **_given(args, "n", "seed", "batch_size"))
    print(json.dumps(metrics))


def _model_choice(args):
    """The model `ranke sample` / `ranke eval` run: --ckpt, --policy, --decoder and the config overrides."""
    from ranke.sample_folder import ModelChoice

    return ModelChoice(checkpoint=args.ckpt, policy=args.policy, decoder=args.decoder, overrides=tuple(_overrides(args)))


def _given(args, *options: str) -> dict:
    """The `options` given on the command line, by name; those left out take the library's defaults."""
    return {option: getattr(args, option) for option in options if getattr(args, option) is not None}


def _add_backbone_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("real backbones (the same as the config keys backbone.*)")
    group.add_argument("--backbone", choices=["toy", "llamagen", "janus"], default=None)
    group.add_argument("--gpt-ckpt", help="LlamaGen GPT checkpoint, e.g. t2i_XL_stage1_256.pt")
    group.add_argument("--vq-ckpt", help="LlamaGen VQ checkpoint, e.g. vq_ds16_t2i.pt")
    group.add_argument("--t5-path", help="local flan-t5-xl directory")
    group.add_argument("--gpt-preset", help="GPT-B, GPT-L, GPT-XL or GPT-XXL (default GPT-XL)")
    group.add_argument("--image-size", type=int, help="256 or 512 (default 256)")
    group.add_argument("--model-path", help="local Janus-Pro directory (transformers save_pretrained layout)")


def _overrides(args) -> list[str]:
    """The command's `key=value` config overrides followed by those its flags stand for
    (`--cfg 4` is `sampling.cfg_scale=4`); a key set both ways is an error."""
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag, None) is not None}
    typed = {item.split("=", 1)[0].strip() for item in args.overrides}
    for key in typed & flags.keys():
        flag = next(flag for flag, flag_key in FLAG_KEYS.items() if flag_key == key)
        raise UserError(f"{key} is set twice, by --{flag.replace('_', '-')} and by {key}=...; give one of them")
    return [*args.overrides, *(f"{key}={value}" for key, value in flags.items())]


def _add_model_choice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None, help="policy file, SFT run, post-training run or checkpoint dir "
                        "(default: committed toy assets)")
    parser.add_argument("--policy", choices=["online", "ema"], default="online", help="policy weights of a checkpoint")
    parser.add_argument("--decoder", choices=["online", "ema", "base"], default="online",
                        help="decoder of a checkpoint (base: the tokenizer the run started from)")


def _add_model_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides of the model's config, e.g. sampling.top_k=0 sampling.temperature=0.9")


def _command(subparsers, name: str, description: str) -> argparse.ArgumentParser:
    """A command's parser. It takes --debug too, so that --debug may come anywhere on the line
    (SUPPRESS: when it is not repeated after the command, the value before it stands)."""
    parser = subparsers.add_parser(name, help=description)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranke", description="RankE: post-training of discrete AR text-to-image models with decoder co-evolution"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    # commands in the order `ranke --help` lists them
    _add_training_commands(sub)
    _add_checkpoint_commands(sub)
    _add_sample_command(sub)

    p = _command(sub, "train-reward", "train the toy reward CLIP, evaluation CLIP and FD feature network")
    p.add_argument("--config", default="toy", help="YAML file or bundled preset name (default: toy)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. reward.features.steps=600")
    p.set_defaults(func=cmd_train_judges)

    p = _command(sub, "fid", "Frechet distance, precision, recall, density and coverage of two image folders (prints JSON)")
    p.add_argument("dir_a", help="the images to judge (e.g. samples)")
    p.add_argument("dir_b", help="the reference images (e.g. real ones): precision is the share of A on B's manifold")
    p.add_argument("--features", choices=["toy", "inception"], default="toy")
    p.add_argument("--inception-weights", default=None, help="clean-fid's inception-2015-12-05.pt (never downloaded)")
    p.add_argument("--size", type=int, default=None, help="center-crop and resize both sides to SIZE first")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_fid)

    _add_eval_command(sub)
    _add_toy_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    p = _command(sub, "train-tokenizer", "train a VQ tokenizer (toy world by default)")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = _command(sub, "sft", "supervised training of the AR policy on tokenizer codes")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_sft)

    p = _command(sub, "posttrain", "post-train policy and decoder: mode=policy (GRPO), decoder or both (RankE)")
    _add_recipe_args(p)
    _add_backbone_args(p)
    p.set_defaults(func=cmd_posttrain)

    p = _command(sub, "build-toy-assets", "rebuild every committed toy asset from seeds (tokenizer, SFT, judges)")
    p.add_argument("--out", default="runs/assets", help="output directory (default: runs/assets)")
    p.add_argument("--install", action="store_true", help="copy the results into the package's assets")
    p.add_argument("--config", default="toy", help="YAML file or bundled preset name (default: toy)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. sft.steps=2000")
    p.set_defaults(func=cmd_build_toy_assets)

    p = _command(sub, "demo", "GRPO vs RankE in the toy world, with a report (report.md / report.html)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a 2-3 minute version (few steps, small evaluation)")
    size.add_argument("--full", action="store_true",
                      help="the frontier study: 2 pressure levels, 5 paired seeds, 400 steps, the mechanism runs")
    size.add_argument("--ablations", action="store_true", help="5 paired seeds at the preset, the ablations and the mechanism runs")
    size.add_argument("--mechanism", action="store_true", help="3 paired seeds and the mechanism runs, no ablations")
    size.add_argument("--policies", action="store_true", help="3 paired seeds of GRPO, DAPO, VA-π and VA-π + RankE's decoder stage")
    p.add_argument("--workers", type=int, default=2, help="post-training runs at a time (default: 2)")
    p.add_argument("--config", default="toy", help="YAML file or bundled preset name (default: toy)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="posttrain config overrides")
    p.set_defaults(func=cmd_demo)


def _add_checkpoint_commands(sub) -> None:
    p = _command(sub, "check-checkpoint", "check a checkpoint file against a model layout")
    p.add_argument("--kind", choices=["vq", "gpt"], required=True)
    p.add_argument("--preset", required=True, help="e.g. VQ-16, GPT-B, GPT-XL, toy")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary unpickling (trusted files only)")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_checkpoint)

    p = _command(sub, "export", "write a post-trained model in LlamaGen's .pt layout or as a transformers Janus folder")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="post-training run (its latest checkpoint) or checkpoint dir")
    p.add_argument("--format", required=True, choices=["llamagen", "hf"],
                   help="llamagen: gpt.pt + vq.pt for LlamaGen's scripts; hf: save_pretrained Janus folder")
    p.add_argument("--out", required=True, help="new, empty output folder")
    p.add_argument("--policy", choices=["online", "ema"], default="online", help="policy weights of the checkpoint")
    p.add_argument("--decoder", choices=["online", "ema"], default="online", help="decoder weights of the checkpoint")
    p.set_defaults(func=cmd_export)


def _add_sample_command(sub) -> None:
    p = _command(sub, "sample", "sample images for prompts (PNG + captions.jsonl)")
    _add_model_choice_args(p)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (or .jsonl with 'caption')")
    p.add_argument("--out", required=True)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: config)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-per-prompt", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace samples in --out made with other settings")
    _add_backbone_args(p)
    _add_model_overrides(p)
    p.set_defaults(func=cmd_sample)


def _add_eval_command(sub) -> None:
    p = _command(sub, "eval", "evaluate on held-out toy prompts: metrics.json, metrics.md, samples.png")
    _add_model_choice_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--n", "--num-prompts", dest="n", type=int, default=None,
                   help="number of prompts (default: toy 1000, coco30k 30000); under torchrun write --num-prompts, "
                        "since torchrun reads --n as an abbreviation of its own options")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: toy 0, coco30k, hpsv2 and geneval 42)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: config)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--protocol", choices=["toy", "coco30k", "hpsv2", "geneval"], default="toy",
                   help="toy: held-out toy prompts and judges; coco30k: the paper's FID / CLIP-score protocol; "
                        "hpsv2: the HPSv2 benchmark (per-style and average HPSv2.1 scores); "
                        "geneval: GenEval's folder layout, scored with a transformers Mask2Former if --detector")
    p.add_argument("--prompts-dir", help="hpsv2: folder with anime.json, concept-art.json, paintings.json, photo.json")
    p.add_argument("--hpsv2-path", help="hpsv2: local HPS_v2.1_compressed.pt")
    p.add_argument("--captions", help="coco30k: COCO captions JSON (one caption per image) or a prompt file")
    p.add_argument("--ref-dir", help="coco30k: folder of reference images (e.g. COCO val2014)")
    p.add_argument("--clip-path", help="coco30k: local CLIP ViT-B/32 directory for the CLIP score; "
                   "geneval: local CLIP ViT-L/14 directory for the colour checks")
    p.add_argument("--metadata", help="geneval: the benchmark's prompts/evaluation_metadata.jsonl")
    p.add_argument("--n-per-prompt", type=int, default=None, help="geneval: images per prompt (default 4)")
    p.add_argument("--detector", help="geneval: local transformers Mask2Former instance-segmentation directory")
    p.add_argument("--features", choices=["inception", "toy"], help="coco30k: FID features (default: inception)")
    p.add_argument("--inception-weights", help="coco30k: local clean-fid Inception file (inception-2015-12-05.pt)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="coco30k, hpsv2, geneval: replace samples in OUT made with other settings")  # fmt: skip
    _add_backbone_args(p)
    _add_model_overrides(p)
    p.set_defaults(func=cmd_eval)


def _add_toy_commands(sub) -> None:
    toy = _command(sub, "toy", "the embedded toy shapes world").add_subparsers(dest="toy_command", required=True)
    p = _command(toy, "sample", "render toy images with captions")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_toy_sample)
    p = _command(toy, "verify", "score a folder of images against captions.jsonl")
    p.add_argument("dir")
    p.set_defaults(func=cmd_toy_verify)


def _raised_at(err: BaseException) -> str:
    """`file:line` of the statement that raised `err`, relative to the package when inside it."""
    frame = traceback.extract_tb(err.__traceback__)[-1]
    path = Path(frame.filename)
    root = Path(__file__).resolve().parent.parent
    return f"{path.relative_to(root) if path.is_relative_to(root) else path}:{frame.lineno}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError) as err:
        # the library's pure code (ranke/algo) raises ValueError for values it cannot use; the
        # line names where, so a ValueError from a bug is not mistaken for bad input
        if args.debug:
            raise
        where = "" if isinstance(err, UserError) else f" (ValueError at {_raised_at(err)}; --debug shows the traceback)"
        print(f"ranke: error: {err}{where}", file=sys.stderr)
        end(2)
    except Stopped as stopped:
        print(f"ranke: {stopped}", file=sys.stderr)
        end(EXIT_STOPPED)
    except SecondSignal as second:  # the recipe turns one during its save into Stopped; this is one just before it
        print(f"ranke: stopped at once by a second {second}; continue with --resume from the newest checkpoint",
              file=sys.stderr)  # fmt: skip
        end(EXIT_STOPPED)
    except RuntimeError as err:
        from ranke.parallel import collective_failure

        if args.debug or not collective_failure(err):
            raise
        from ranke.train.preemption import record_lost_process

        print(f"ranke: error: {record_lost_process(err)}", file=sys.stderr)
        end(EXIT_LOST_PROCESS)
    except KeyboardInterrupt:
        print("ranke: interrupted", file=sys.stderr)
        end(130)
    finally:
        release_all()
    end(0)


def end(code: int) -> None:
    """End the command with exit code `code`. A process of a multi-process job leaves without the
    interpreter's finalisation: there a gloo thread that still holds a finished collective's
    tensors must take the interpreter lock to free them, and the process aborts instead (-6,
    "terminate called without an active exception"), in a run that ended well as in one that lost
    a process. Everything a run writes is closed by then; the locks are released here. In a single
    process, 0 returns (a caller in Python goes on) and any other code raises SystemExit."""
    if "torch" in sys.modules and _in_multi_process_job():
        release_all()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def _in_multi_process_job() -> bool:
    import torch

    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


if __name__ == "__main__":
    main()
