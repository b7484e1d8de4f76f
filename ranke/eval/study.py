"""A study as data: the methods it runs and the comparisons its report makes between them.

A `MethodSpec` is one method (its name, the posttrain settings of its runs, the decoders its
report rows read); a `Study` holds the methods and its comparisons as pairs of those specs, so a
method is named in one place and a comparison follows it through a rename; a comparison of a
method the study lacks is refused when the study is built. `Method` is the runs of one method,
one run directory per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MethodSpec:
    """One method of a study: what its runs set on top of the study's posttrain settings, and the
    decoders whose evaluations make its report rows."""

    name: str  # e.g. "GRPO", "RankE"
    overrides: tuple[str, ...]  # posttrain key=value settings of its runs
    decoder: str  # decoder whose metrics make its table row: base (frozen), ema or online
    extra_decoders: tuple[str, ...] = ()  # further rows, e.g. RankE's online decoder
    note: str = ""  # what it is, for the report's list of methods
    group: str = ""  # the part of the study it belongs to (a pressure level): one reward-fidelity plane each
    # its runs start from the final policy of this method's run of the same seed (None: from SFT)
    starts_from: MethodSpec | None = None

    @property
    def decoders(self) -> tuple[str, ...]:
        """Every decoder with a row of its own, the table row's first."""
        return (self.decoder, *self.extra_decoders)


@dataclass(frozen=True)
class Study:
    """The methods of a study, in report order, and its comparisons: (A, B) gives the paired
    difference A - B over the seeds both have."""

    methods: tuple[MethodSpec, ...]
    comparisons: tuple[tuple[MethodSpec, MethodSpec], ...] = ()

    def __post_init__(self) -> None:
        names = [method.name for method in self.methods]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"a study names each method once; repeated: {', '.join(repeated)}")
        for a, b in self.comparisons:
            missing = [method.name for method in (a, b) if method not in self.methods]
            if missing:
                raise ValueError(
                    f"comparison '{a.name}' - '{b.name}' names {', '.join(map(repr, missing))}, not a method of "
                    f"the study ({', '.join(names)})"
                )

    def extended(self, methods: tuple[MethodSpec, ...], comparisons: tuple[tuple[MethodSpec, MethodSpec], ...] = ()) -> Study:
        """This study with further methods and comparisons (checked as any new study)."""
        return Study((*self.methods, *methods), (*self.comparisons, *comparisons))

    def compared(self, methods: list[Method]) -> list[tuple[Method, Method]]:
        """The study's comparisons as pairs of the runs in `methods`; every compared method needs its runs."""
        by_spec = {method.spec: method for method in methods}
        absent = [spec.name for pair in self.comparisons for spec in pair if spec not in by_spec]
        if absent:
            raise ValueError(f"the study compares {', '.join(dict.fromkeys(absent))}, but no runs of it were given")
        return [(by_spec[a], by_spec[b]) for a, b in self.comparisons]


@dataclass
class Method:
    """The runs of one method of a study, one run directory per seed."""

    spec: MethodSpec
    runs: list[Path]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def decoder(self) -> str:
        return self.spec.decoder
