"""Which precision a run's forward passes use, and a one-line description of the machine.

`precision=auto` (the default of every recipe and of `ranke demo`) chooses bf16 autocast where it
is fast and fp32 elsewhere:

* CUDA: bf16 where the GPU supports it (`torch.cuda.is_bf16_supported()`), else fp32.
* CPU: bf16 only where the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX, as oneDNN
  reports) *and* a short measurement at the model's width shows bf16 faster than fp32. Elsewhere
  oneDNN emulates bf16, and one matrix product at the toy policy's shape takes 7-60x as long as
  in fp32 (docs/benchmarks.md). The measurement is cached per machine (CPU, instruction set,
  torch version, threads and width) in `$RANKE_CACHE_DIR` (default `~/.cache/ranke`).

An explicit `precision=bf16` runs as asked; on a CPU where bf16 is slower it says by how much.
What was chosen and why travels as a `PrecisionChoice` into the run's config (the precision),
its metrics and evaluation records and the demo's report (the reason).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ranke.runtime import PRECISIONS, UserError, warn

REQUESTABLE = ("auto", *PRECISIONS)
# bf16 is chosen on a CPU only when it is at least this much faster: on a tie, fp32's exactness wins
MIN_BF16_SPEEDUP = 1.1
MEASURED_TOKENS = 256  # rows of the measured product: the toy policy's 16 x 16 image tokens


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses (`name`: fp32 or bf16), what was asked for, and why, in one sentence."""

    name: str
    requested: str
    reason: str

    def as_record(self) -> dict:
        """The record form (`run_` keeps it apart from the evaluation's precision/recall metric)."""
        return {"run_precision": self.name, "run_precision_requested": self.requested, "run_precision_reason": self.reason}


def check_requested(precision: str) -> str:
    if precision not in REQUESTABLE:
        raise UserError(f"precision='{precision}' is not one of {', '.join(REQUESTABLE)}")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU (AVX512-BF16, AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line that a benchmark figure or report prints beside a time: the CPU, its instruction
    set as torch uses it, whether bf16 matrix products are native, threads and the current load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 matmul native: {'yes' if cpu_has_native_bf16() else 'no'}; {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads; load {load:.2f}"
    )


def _seconds(run, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return time.perf_counter() - started


@torch.no_grad()
def measure_bf16_speedup(width: int, samples: int = 11, calls: int = 5) -> float:
    """fp32 time over bf16-autocast time of one linear layer at the policy's shape on the CPU
    ([MEASURED_TOKENS, width] @ [width, 4 width], the MLP's first product); > 1: bf16 is faster.
    The two are timed in alternation and the median of the per-sample ratios is returned, so a
    change of load on a shared machine weighs on both alike."""
    generator = torch.Generator().manual_seed(0)  # the run's global generators stay untouched: seeded runs repeat
    weight, bias = torch.randn(4 * width, width, generator=generator), torch.randn(4 * width, generator=generator)
    inputs = torch.randn(MEASURED_TOKENS, width, generator=generator)

    def fp32():
        torch.nn.functional.linear(inputs, weight, bias)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(inputs, weight, bias)

    _seconds(fp32, calls), _seconds(bf16, calls)  # the first calls build oneDNN's kernels and thread pool
    ratios = sorted(_seconds(fp32, calls) / _seconds(bf16, calls) for _ in range(samples))
    return ratios[len(ratios) // 2]


def cache_path() -> Path:
    return Path(os.environ.get("RANKE_CACHE_DIR") or Path.home() / ".cache" / "ranke") / "precision.json"


def cached_bf16_speedup(width: int, measure=measure_bf16_speedup) -> float:
    """`measure(width)`, measured once per machine and setting and then read from `cache_path()`."""
    key = (
        f"alternating medians | {cpu_name()} | {torch.backends.cpu.get_cpu_capability()} | native {cpu_has_native_bf16()} | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads | width {width}"
    )
    path = cache_path()
    cache = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(path.read_text())
    if not isinstance(cache.get(key), (int, float)):
        cache[key] = round(measure(width), 3)
        with contextlib.suppress(OSError):  # a read-only home only costs a re-measurement next time
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(cache, indent=1))
            temporary.replace(path)
    return float(cache[key])


def choose_precision(
    requested: str, device: torch.device, width: int, native_bf16=cpu_has_native_bf16, bf16_speedup=cached_bf16_speedup
) -> PrecisionChoice:
    """Resolve `requested` (auto | fp32 | bf16) for a model of `width` on `device` (module docstring).

    `native_bf16()` and `bf16_speedup(width)` are the CPU's answers, replaceable for tests."""
    check_requested(requested)
    if requested == "fp32":
        return PrecisionChoice("fp32", requested, "fp32 as requested")
    if device.type == "cuda":
        if requested == "bf16":
            return PrecisionChoice("bf16", requested, "bf16 as requested")
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", requested, "auto: this GPU supports bf16")
        return PrecisionChoice("fp32", requested, "auto: this GPU does not support bf16")
    capability = torch.backends.cpu.get_cpu_capability()
    if not native_bf16():
        slower = f"this CPU ({capability}) has no native bf16 matrix products"
        if requested == "bf16":
            warn(f"precision=bf16 on {slower}: it runs {1 / bf16_speedup(width):.1f}x slower than fp32 here; precision=auto chooses fp32")
            return PrecisionChoice("bf16", requested, f"bf16 as requested ({slower})")
        return PrecisionChoice("fp32", requested, f"auto: {slower}")
    speedup = bf16_speedup(width)
    measured = f"measured bf16 {speedup:.2f}x as fast as fp32 at width {width} on this CPU ({capability})"
    if requested == "bf16":
        if speedup < 1:
            warn(f"precision=bf16: {measured}, i.e. {1 / speedup:.1f}x slower; precision=auto chooses fp32")
        return PrecisionChoice("bf16", requested, f"bf16 as requested ({measured})")
    if speedup >= MIN_BF16_SPEEDUP:
        return PrecisionChoice("bf16", requested, f"auto: native bf16, {measured}")
    return PrecisionChoice("fp32", requested, f"auto: native bf16 but {measured}, below {MIN_BF16_SPEEDUP}x")
