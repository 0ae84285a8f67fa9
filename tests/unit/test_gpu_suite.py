"""The GPU suite's plan and summary logic (bench/gpu/suite.py), and its dry run (bench/gpu/run.sh).

The dry run needs the wheels `bash bench/gpu/prepare.sh` downloads (network); without them it is
skipped with that reason.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench", "gpu"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import suite  # noqa: E402


def by_key(rows):
    return {r.key: r for r in rows}


def test_full_plan_has_every_row_and_fits_the_budget():
    rows = suite.plan(quick=False, backends=("flash", "te"))
    keys = set(by_key(rows))
    assert {"b32-engine-sdpa", "b32-open_clip-sdpa", "l14-engine-sdpa", "l14-open_clip-sdpa",
            "l14-engine-sdpa-recompute", "l14-engine-flash", "l14-engine-te", "l14-checkpoint-sdpa"} == keys
    assert sum(r.estimate_s for r in rows) <= suite.FULL_BUDGET_S


def test_quick_plan_is_the_four_comparison_rows_within_its_budget():
    rows = suite.plan(quick=True, backends=("flash", "te"))
    assert [r.key for r in rows] == ["b32-engine-sdpa", "b32-open_clip-sdpa", "l14-engine-sdpa", "l14-open_clip-sdpa"]
    assert sum(r.estimate_s for r in rows) <= suite.QUICK_BUDGET_S


def test_optional_backends_only_when_they_import():
    assert not any(r.attention in ("flash", "te") for r in suite.plan(quick=False, backends=()))


def test_rows_of_a_model_share_the_batch_and_engine_rows_run_bf16_o2():
    rows = by_key(suite.plan(quick=False, backends=("flash",)))
    assert rows["l14-engine-sdpa"].batch == rows["l14-open_clip-sdpa"].batch == rows["l14-engine-sdpa-recompute"].batch
    for key in ("b32-engine-sdpa", "l14-engine-flash", "l14-engine-sdpa-recompute"):
        overrides = rows[key].overrides
        assert "trainer.precision=bf16" in overrides and "model.megatron_amp_O2=true" in overrides
        assert f"model.attention_backend={rows[key].attention}" in overrides
    assert set(suite.RECOMPUTE) <= set(rows["l14-engine-sdpa-recompute"].overrides)
    # recompute keeps one layer input per layer instead of every activation
    assert rows["l14-engine-sdpa-recompute"].predicted_memory_gib < 0.5 * rows["l14-engine-sdpa"].predicted_memory_gib


def test_batch_is_halved_until_the_estimate_fits_the_device():
    big = by_key(suite.plan(quick=True, device_memory_gib=139.0))
    small = by_key(suite.plan(quick=True, device_memory_gib=24.0))
    assert big["l14-engine-sdpa"].batch == 128
    assert small["l14-engine-sdpa"].batch < 128
    assert small["l14-engine-sdpa"].predicted_memory_gib <= 0.85 * 24.0
    assert small["l14-open_clip-sdpa"].batch == small["l14-engine-sdpa"].batch


def test_summary_derives_mfu_ratios_recompute_cost_and_targets():
    rows = [r for r in suite.plan(quick=False) if r.model == "l14" and r.kind != "checkpoint"]
    rows = by_key(rows)
    base, ref, rec = rows["l14-engine-sdpa"], rows["l14-open_clip-sdpa"], rows["l14-engine-sdpa-recompute"]
    results = {
        base.key: {"samples_per_s": 1000.0, "peak_memory_gib": base.predicted_memory_gib / 1.05},
        ref.key: {"samples_per_s": 700.0},
        rec.key: {"samples_per_s": 800.0, "peak_memory_gib": 12.0},
    }
    checks = suite.summarize(list(rows.values()), results, peak=989.0, gpus=1)
    tflops = base.flops_per_sample * 1000.0 / 1e12
    assert results[base.key]["tflops_per_gpu"] == pytest.approx(tflops)
    assert results[base.key]["mfu"] == pytest.approx(tflops / 989.0)
    assert results[base.key]["vs_open_clip"] == pytest.approx(1000 / 700)
    assert results[base.key]["estimator_error"] == pytest.approx(0.05)
    assert results[rec.key]["recompute_time_cost"] == pytest.approx(0.25)
    assert results[rec.key]["recompute_memory_saved_gib"] == pytest.approx(base.predicted_memory_gib / 1.05 - 12.0)
    assert checks["L/14 >= 1.3x open_clip"] is True
    assert checks["L/14 MFU >= 45%"] is (tflops / 989.0 >= 0.45)
    # the recompute row's estimate is far from 12 GiB here, so the estimator target is not met
    assert checks["memory estimate within 10%"] is (abs(rec.predicted_memory_gib / 12.0 - 1) <= 0.10)


def test_table_names_failed_and_skipped_rows():
    rows = suite.plan(quick=True)
    results = {rows[0].key: {"error": "failed: RuntimeError: boom"}, rows[1].key: {"skipped": "skipped: budget"},
               rows[2].key: {"samples_per_s": 10.0, "peak_memory_gib": 30.0}, rows[3].key: {"samples_per_s": 5.0}}
    checks = suite.summarize(rows, results, peak=989.0, gpus=1)
    table = suite.markdown("header", rows, results, checks)
    assert "failed: RuntimeError: boom" in table and "skipped: budget" in table
    assert "| L/14 engine BF16 O2, sdpa | 128 | 10 |" in table
    assert "2.00x" in table  # 10 vs 5 samples/s


def test_dry_run_installs_and_imports_the_wheel_set():
    wheels = os.path.join(ROOT, "bench", "gpu", "wheels")
    specs = suite.wheel_specs()
    have = [f for f in os.listdir(wheels)] if os.path.isdir(wheels) else []
    if len(have) < len(specs):
        pytest.skip(f"bench/gpu/wheels holds {len(have)} of {len(specs)} wheels: run `bash bench/gpu/prepare.sh` "
                    "(needs the network) to test the dry run")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu", "run.sh"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 0, out
    assert "dry run: 0 problem(s)" in out
    for dist, version, _module in specs:
        assert f"{dist}=={version}" in out
    assert f"{'models.clip.family':<22} imports" in out
    assert "estimated total" in out
