"""scripts/gpu_checks.py on CPU (the checks a borrowed GPU runs, here on the machine that prepares them): one launcher job
(uninterrupted run, hard kill, resume, weights compared) ends as on the GPU and its summary says where it ran; a dry run
that fails is a record with its error, not a crash of the loop; the committed H200 record covers every GPU case."""
import json, subprocess, sys
from pathlib import Path
import pytest
from distill_nb.launch import launch_report

ROOT = Path(__file__).resolve().parents[1]

def test_launcher_job_on_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT/"scripts"/"gpu_checks.py"), "--out", str(tmp_path), "--parts", "launchers",
                        "--papers", "hinton", "--timeout", "300"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, launch_report(p)
    r = json.loads((tmp_path/"gpu_checks.json").read_text())["launchers"]["hinton"]
    assert r["ok"] and r["killed"]["rc"] == 17, r                       # the hook kills rank 0 with exit 17
    assert r["weights"]["bit_identical"] and r["weights"]["files"] == ["student.safetensors"], r["weights"]
    assert r["ref"]["device_line"] and " on cpu, mixed precision bf16" in r["ref"]["device_line"][0], r["ref"]["device_line"]
    assert r["resumed"]["summary"]["resumed_from"] is not None

def test_failed_case_is_a_record():
    from distill_nb import plan
    plan.GPU_DRY_RUNS["_bad"] = ("hinton", "hinton/tiny.yaml", "no such phase", [], 1, None)
    try: (r,) = plan.gpu_dry_runs(["_bad"], device="cpu")
    finally: del plan.GPU_DRY_RUNS["_bad"]
    assert r["case"] == "_bad" and r["error"].startswith("ValueError: hinton: no phase 'no such phase'"), r

def test_h200_record_covers_every_case():
    from distill_nb.plan import GPU_DRY_RUNS
    rec = json.loads((ROOT/"results"/"device"/"h200.json").read_text())
    assert [r["case"] for r in rec["dryruns"]] == list(GPU_DRY_RUNS)
    assert all("error" not in r and r["reload_equal"] and r["planned"] > 0 for r in rec["dryruns"])
    assert all(j["ok"] and j["weights"]["bit_identical"] for j in rec["launchers"].values())
    sys.path.insert(0, str(ROOT/"scripts")); from gpu_checks import device_checks
    assert rec["checks"] == device_checks(rec) and all(c["role"] == "guard" and c["passed"] for c in rec["checks"].values()), rec["checks"]
