"""`ranke build-toy-assets`: rebuild every committed toy asset from seeds with one command.

    ranke build-toy-assets --out runs/assets [--install] [key=value ...]

Runs, in order, the tokenizer recipe, the SFT recipe on that tokenizer's codes (its codes are
what the policy learns; in bf16, as the committed policy was trained), and the reward recipe (the two toy CLIPs and the feature network, which
see only rendered images). The five files are gathered in `OUT/assets/` under their committed
names; `--install` copies them into the package (`ranke/assets/`). A stage whose asset already
exists in its run directory is reused, and an interrupted tokenizer or SFT stage resumes from its
last checkpoint, so an interrupted build continues where it stopped.
Overrides use dotted keys (`tokenizer.steps=1200`, `sft.steps=2000`, `reward.features.steps=300`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ranke.assets import ASSET_DIR, ASSET_FILES

SIZE_LIMIT_MB = 25.0


def build_toy_assets(out_dir: str, config: str = "toy", overrides: list[str] = (), install: bool = False) -> dict:
    from ranke.train.judges import train_judges
    from ranke.train.sft import train_sft
    from ranke.train.tokenizer import train_tokenizer

    out = Path(out_dir)
    tokenizer_file = out / "tokenizer" / ASSET_FILES["tokenizer"]
    stages = [
        ("tokenizer", tokenizer_file, lambda: train_tokenizer(config, str(out / "tokenizer"), list(overrides), resume=True)),
        (
            "policy",
            out / "sft" / ASSET_FILES["policy"],
            # precision=auto: the committed policy trained in bf16 on a CPU with native bf16
            lambda: train_sft(config, str(out / "sft"), [*overrides, f"sft.tokenizer={tokenizer_file}"], resume=True),
        ),
        ("reward", out / "reward" / ASSET_FILES["features"], lambda: train_judges(config, str(out / "reward"), list(overrides))),
    ]
    minutes = {}
    for name, product, build in stages:
        if product.is_file():
            print(f"build-toy-assets: {name}: reusing {product}")
            continue
        print(f"build-toy-assets: {name} ...")
        started = time.perf_counter()
        build()
        minutes[name] = round((time.perf_counter() - started) / 60, 2)
        print(f"build-toy-assets: {name} took {minutes[name]:.1f} min")

    sources = {
        "tokenizer": tokenizer_file,
        "policy": out / "sft" / ASSET_FILES["policy"],
        **{name: out / "reward" / ASSET_FILES[name] for name in ("reward_clip", "eval_clip", "features")},
    }
    gathered = out / "assets"
    gathered.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, source in sources.items():
        shutil.copyfile(source, gathered / ASSET_FILES[name])
        sizes[ASSET_FILES[name]] = round(source.stat().st_size / 2**20, 2)
    total = sum(sizes.values())
    if install:
        for file in sizes:
            shutil.copyfile(gathered / file, ASSET_DIR / file)
    summary = {"minutes": minutes, "sizes_mb": sizes, "total_mb": round(total, 2), "installed": install}
    (out / "build.json").write_text(json.dumps(summary, indent=2))
    for file, size in sizes.items():
        print(f"  {file:32s} {size:6.2f} MB")
    print(f"build-toy-assets: {total:.1f} MB in {gathered}" + (f", installed into {ASSET_DIR}" if install else ""))
    if total > SIZE_LIMIT_MB:
        print(f"build-toy-assets: warning: {total:.1f} MB is above the {SIZE_LIMIT_MB:.0f} MB budget for committed assets")
    return summary
