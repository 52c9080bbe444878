"""Smoke test of the benchmark script: `benchmarks/run.py --quick` runs and reports.

No timing is asserted: the quick sizes are far too small to measure anything,
and CI machines are noisy. This only checks that every case runs, every run
succeeds, and the JSON report is complete.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"1_partial", "2_fanout", "3_memory", "4_plan", "5_sharded", "6_scaling", "7_sync"}


def test_quick_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "run.py"),
            "--quick",
            "--json",
            str(out),
            "--tmpdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert {c["id"] for c in results["cases"]} == CASES
    for case in results["cases"]:
        assert case["aims"], case["id"]
        for config in case["configs"]:
            assert set(config["summary"]) == set(config["variants"])
            for variant, row in config["summary"].items():
                where = f"{case['id']} {config['name']} {variant}"
                assert row["errors"] == [] and row["runs"] >= 1, where
                assert row["time_s"] is not None and row["time_s"] > 0, where
                assert row["peak_rss"] > 0, where
    for key in ("nproc", "cpu_model", "memory_total", "python", "jax", "orbax-checkpoint"):
        assert results["machine"][key], key
    assert results["command"].startswith("python benchmarks/run.py --quick")
    # The data directory lived under tmp_path and is gone.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("treegraft-bench-")]
    assert "Aims:" in proc.stdout
    # The error-path case (a script of its own) ran every case, each failing plan failing.
    error_path = results["extra"]["error_path"]
    assert "failed" not in error_path, error_path.get("stderr")
    ids = [r["id"] for r in error_path["rows"]]
    assert ids == ["moe", "flat3", "flat110", "ignores", "node100k"]


def test_quick_convert_benchmark_runs_and_writes_json(tmp_path):
    # The write side's case (benchmarks/convert_case.py), through run.py's EXTRA.
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--cases",
         "convert", "--json", str(out), "--tmpdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    convert = json.loads(out.read_text())["extra"]["convert"]
    assert "failed" not in convert, convert.get("stderr")
    assert convert["values_agree"] is True
    assert set(convert["runs"]) == {
        "convert/4MiB/treegraft", "convert/4MiB/naive", "convert/4MiB/cp",
        "convert/4MiB/readwrite", "export/4MiB/treegraft", "export/4MiB/save_file",
    }
    for key, runs in convert["runs"].items():
        assert len(runs) == 1 and runs[0]["ok"] and runs[0]["time_s"] > 0, key
    assert {a["met"] for a in convert["aims"]} == {None}  # --quick judges nothing
    assert "export" in convert["report"]
