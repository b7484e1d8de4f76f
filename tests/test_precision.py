"""`precision=auto`: bf16 only where the machine runs it natively and faster, fp32 elsewhere; the
choice is cached per machine, recorded in the run, kept on resume and shared by a study's runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ranke import precision as precision_lib
from ranke.config import RunConfig
from ranke.demo import PRECISION_FILE, study_precision
from ranke.precision import PrecisionChoice, cached_bf16_speedup, choose_precision
from ranke.runtime import UserError
from ranke.train.posttrain import train_posttrain

CPU = torch.device("cpu")


def choose(requested, native, speedup):
    return choose_precision(requested, CPU, 192, native_bf16=lambda: native, bf16_speedup=lambda width: speedup)


def test_auto_is_fp32_on_a_cpu_without_native_bf16_without_measuring():
    def never(width):
        raise AssertionError("no measurement is needed where bf16 is emulated")

    choice = choose_precision("auto", CPU, 192, native_bf16=lambda: False, bf16_speedup=never)
    assert choice == PrecisionChoice("fp32", "auto", f"auto: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matrix products")


@pytest.mark.parametrize("speedup, chosen", [(1.6, "bf16"), (1.1, "bf16"), (1.09, "fp32"), (0.8, "fp32")])
def test_auto_on_a_cpu_with_native_bf16_follows_the_measurement(speedup, chosen):
    choice = choose("auto", True, speedup)
    assert choice.name == chosen
    assert f"measured bf16 {speedup:.2f}x as fast as fp32 at width 192" in choice.reason


def test_explicit_bf16_runs_where_it_is_slower_and_says_by_how_much(capsys):
    assert choose("bf16", False, 0.125).name == "bf16"
    assert "it runs 8.0x slower than fp32 here; precision=auto chooses fp32" in capsys.readouterr().err
    assert choose("bf16", True, 0.5).name == "bf16"
    assert "i.e. 2.0x slower" in capsys.readouterr().err
    assert choose("bf16", True, 1.5).name == "bf16"
    assert capsys.readouterr().err == ""  # faster: nothing to say


def test_fp32_is_never_measured_and_a_bad_value_is_one_line():
    assert choose("fp32", True, 9.0) == PrecisionChoice("fp32", "fp32", "fp32 as requested")
    with pytest.raises(UserError, match="precision='fp16' is not one of auto, fp32, bf16"):
        choose("fp16", True, 9.0)


def test_the_measurement_is_cached_per_machine_and_width(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKE_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(width):
        calls.append(width)
        return 1.5 + width / 1000

    assert cached_bf16_speedup(192, measure) == 1.692
    assert cached_bf16_speedup(192, measure) == 1.692
    assert cached_bf16_speedup(64, measure) == 1.564
    assert calls == [192, 64]
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert sorted(value for value in cache.values()) == [1.564, 1.692]
    assert all(torch.backends.cpu.get_cpu_capability() in key and "torch " + torch.__version__ in key for key in cache)


def test_the_real_measurement_is_a_positive_ratio_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert 0 < precision_lib.measure_bf16_speedup(32) < 1000
    assert torch.equal(torch.get_rng_state(), state)  # a run measured on its first start repeats exactly


def test_emulated_avx2_chooses_fp32_on_this_machine(tmp_path):
    """The slow path of an AVX2 laptop, reproduced on any x86 CPU by capping oneDNN and ATen at AVX2."""
    code = (
        "import torch; from ranke.precision import choose_precision, cpu_has_native_bf16, measure_bf16_speedup; "
        "c = choose_precision('auto', torch.device('cpu'), 192); print(cpu_has_native_bf16(), c.name, measure_bf16_speedup(192))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "RANKE_CACHE_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}  # as a demo worker measures
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    native, chosen, speedup = out.split()
    assert (native, chosen) == ("False", "fp32")
    assert float(speedup) < 0.5  # emulated bf16: several times slower than fp32 (measured 0.15)


TINY = ["prompts_per_step=2", "group_size=2", "grid_prompts=2", "eval_samples=0", "seed=3", "mode=policy",
        "save_every=1", "grid_every=100", "steps=1"]  # fmt: skip


def test_a_run_records_its_precision_and_a_resume_keeps_it(tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    train_posttrain("toy", str(run), [*TINY, "precision=fp32"])
    assert "posttrain: precision fp32 (fp32 as requested)" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "fp32"
    train_posttrain("toy", str(run), [*TINY, "steps=2"], resume=True)  # auto: the run's own precision
    assert "posttrain: precision fp32 (fp32 as requested)" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["precision/bf16"] for record in records] == [0, 0]
    with pytest.raises(UserError, match=r"--resume cannot change precision \(the run has 'fp32', now 'bf16'\)"):
        train_posttrain("toy", str(run), [*TINY, "steps=3", "precision=bf16"], resume=True)


def test_a_worker_run_logs_one_progress_line_per_step(tmp_path, one_thread, capsys):
    train_posttrain("toy", str(tmp_path / "run"), [*TINY, "steps=2", "precision=fp32"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("posttrain[policy]: step")]
    assert [line.split(",")[0] for line in lines] == ["posttrain[policy]: step 1/2", "posttrain[policy]: step 2/2"]
    assert all(" s/step, ETA " in line and ", toy_clip " in line for line in lines)


def write_run(out, name, precision):
    (out / "runs" / name).mkdir(parents=True)
    (out / "runs" / name / "config.yaml").write_text(yaml.safe_dump({"precision": precision}))


def study_cfg(precision):
    cfg = RunConfig()
    cfg.precision = precision
    return cfg


def test_a_study_keeps_the_precision_its_runs_started_in(tmp_path):
    write_run(tmp_path, "grpo_seed0", "bf16")
    choice = study_precision(tmp_path, study_cfg("auto"), CPU, threads=1)
    assert (choice.name, choice.reason) == ("bf16", "the study's runs were started in it")
    assert json.loads((tmp_path / PRECISION_FILE).read_text())["run_precision"] == "bf16"
    assert study_precision(tmp_path, study_cfg("bf16"), CPU, threads=1).name == "bf16"
    with pytest.raises(UserError, match="runs were started in bf16: precision=fp32 would mix precisions within the study"):
        study_precision(tmp_path, study_cfg("fp32"), CPU, threads=1)


def test_a_study_whose_runs_differ_is_refused(tmp_path):
    write_run(tmp_path, "grpo_seed0", "bf16")
    write_run(tmp_path, "ranke_seed0", "fp32")
    with pytest.raises(UserError, match="holds runs in bf16 and fp32: a study's runs share one precision"):
        study_precision(tmp_path, study_cfg("auto"), CPU, threads=1)


def test_a_new_study_records_the_choice_and_the_machine(tmp_path):
    choice = study_precision(tmp_path, study_cfg("fp32"), CPU, threads=1)
    saved = json.loads((tmp_path / PRECISION_FILE).read_text())
    assert saved == {**choice.as_record(), "machine": saved["machine"]}
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in saved["machine"]
    assert "bf16 matmul native: " in saved["machine"]
