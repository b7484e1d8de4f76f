"""RankE-py: post-training for discrete autoregressive text-to-image models with decoder co-evolution.

The Python API (`ranke.api`) is importable from here: `ranke.load_config`, `ranke.posttrain`,
`ranke.sft`, `ranke.train_tokenizer`, `ranke.train_reward` and their `ranke.RunResult`. It loads on
first use, so that `import ranke.<module>` (worker processes, the command line) does not pay for it.
"""

__version__ = "0.1.0"

API = ("load_config", "posttrain", "sft", "train_tokenizer", "train_reward", "RunResult")


def __getattr__(name: str):
    if name in API:
        from ranke import api

        return getattr(api, name)
    raise AttributeError(f"module 'ranke' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
