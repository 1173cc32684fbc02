"""The checks that need a GPU, as one prepared script for a borrowed machine.

1. launchers: each paper's launcher on one GPU with its tiny config in bf16 (1 process): an uninterrupted run, a run
   killed hard mid-training, and its resume; the resumed run's weights against the uninterrupted run's.
2. realsize: Distiller's GLUE launcher at its real architectures (random BERT-base teacher -> TinyBERT-4L-312D) on a
   synthetic MNLI folder, bf16, sequence length 128, a teacher fine-tuning phase, then the student.
3. dryruns: `distill_nb.plan.GPU_DRY_RUNS`, each shipped full config's phase at its per-device micro-batch and its own
   resolution (`gpu_dry_runs`), one after another in one process.

Parts 1 and 2 run side by side (separate processes on the one GPU); part 3 runs after them, alone, so that its
timings are its own. Everything goes to --out (default $OUT, else runs/gpu_checks): gpu_checks.json, rewritten as each
part finishes, and the tail of each run's log. Then, on any machine:

    python scripts/gpu_checks.py --merge gpu_checks.json

adds the planner's peak to each dry run (the same `plan_dry` call as the CPU dry runs, measured on this CPU) and writes
results/device/<gpu>.json, which nbs/07b_plan.ipynb shows.

    PYTHONPATH=. python scripts/gpu_checks.py [--out DIR] [--parts launchers,realsize,dryruns] [--cases a,b] [--timeout S]
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT/"configs"
TOKENIZER = ROOT/".gpu"/"minilm_tok"   # the bundled MiniLM tokenizer's files (config.json, vocab.txt, tokenizer*.json), carried

LAUNCH_JOBS = {   # paper: (tiny config, --set overrides, the hard-kill hook)
    "hinton": ("hinton/tiny.yaml", ["mixed_precision=bf16", "num_workers=2"], {"DISTILL_NB_CRASH_AT_STEP": "12"}),
    "distiller": ("distiller/tiny.yaml", ["mixed_precision=bf16", "data_root={glue}", "tokenizer={tok}"], {"DISTILL_NB_CRASH_AT_STEP": "12"}),
    "similar": ("similar/tiny.yaml", ["mixed_precision=bf16"], {"DISTILL_NB_CRASH_AT_STEP": "12"}),
    "diswot": ("diswot/tiny.yaml", ["mixed_precision=bf16"], {"DISTILL_NB_CRASH_AT_STEP": "12"}),
    "disback": ("disback/tiny.yaml", ["mixed_precision=bf16"], {"DISTILL_NB_CRASH_AT_STEP": "7"}),
    "hyper_sd": ("hyper_sd/tiny.yaml", ["mixed_precision=bf16"], {"DISTILL_NB_CRASH_AT_STEP": "6"}),
}

def _weights(d:Path)->dict:
    "The run's saved weights (every .safetensors outside its checkpoints and caches), by relative path."
    from safetensors.torch import load_file
    return {str(f.relative_to(d)): load_file(f) for f in sorted(d.rglob("*.safetensors"))
            if not {"checkpoints", "cache", "home", "teacher"} & set(f.relative_to(d).parts[:-1])}

def _compare(a:dict, b:dict)->dict:
    "Bit-identical or not, and the largest absolute difference, over the files and tensors both runs saved."
    files = sorted(set(a) & set(b)); diff, same = 0.0, True
    for f in files:
        if a[f].keys() != b[f].keys(): same = False; continue
        for k in a[f]:
            x, y = a[f][k].float(), b[f][k].float()
            if x.shape != y.shape: same = False; continue
            same &= bool((a[f][k] == b[f][k]).all()); diff = max(diff, float((x - y).abs().max()) if x.numel() else 0.0)
    return dict(files=files, only_ref=sorted(set(a) - set(b)), only_resumed=sorted(set(b) - set(a)), bit_identical=same and bool(files), max_abs_diff=diff)

def _run(paper, cfg, out, sets, cwd, home, timeout, **env):
    from distill_nb.launch import run_launch
    t0 = time.time()
    env.setdefault("DISTILL_NB_PROGRESS", "1")      # bars on: the launcher then prints where it runs (device, precision)
    try: p = run_launch(paper, cfg, out, 1, sets, home=home, cwd=cwd, timeout=timeout, **env); rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e: rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    where = [l for l in err.splitlines() if l.startswith("distill_nb: ")]     # make_accelerator's line: processes, device, precision
    return dict(rc=rc, wall_s=round(time.time() - t0, 1), device_line=where[:1], stderr_tail=err[-1500:])

def launcher_job(paper:str, timeout:float)->dict:
    "An uninterrupted run, a run killed hard mid-training, its resume; summaries and the weights compared."
    cfg, sets, crash = LAUNCH_JOBS[paper]
    d = Path(tempfile.mkdtemp(prefix=f"gpu-{paper}-")); glue = ""
    if "{glue}" in " ".join(sets):
        from distill_nb.distiller_full import write_synthetic_glue
        glue = write_synthetic_glue(d/"data")
    sets = [s.format(glue=glue, tok=TOKENIZER) for s in sets]
    r = dict(paper=paper, config=cfg, sets=sets, crash=crash)
    r["ref"] = _run(paper, CONFIGS/cfg, d/"ref", sets, d, d/"home", timeout)
    r["killed"] = _run(paper, CONFIGS/cfg, d/"run", sets, d, d/"home", timeout, **crash)
    r["resumed"] = _run(paper, CONFIGS/cfg, d/"run", sets, d, d/"home", timeout)
    for k, sub in (("ref", "ref"), ("resumed", "run")):
        f = d/sub/"summary.json"
        if f.exists(): r[k]["summary"] = json.loads(f.read_text())
    if r["ref"]["rc"] == 0 and r["resumed"]["rc"] == 0: r["weights"] = _compare(_weights(d/"ref"), _weights(d/"run"))
    r["ok"] = r["ref"]["rc"] == 0 and r["killed"]["rc"] not in (0, "timeout") and r["resumed"]["rc"] == 0
    return r

def realsize_job(timeout:float)->dict:
    "Distiller's GLUE launcher at the real architectures on synthetic MNLI, one process, bf16: its wall time and summary."
    from distill_nb.distiller_full import write_synthetic_glue
    d = Path(tempfile.mkdtemp(prefix="gpu-distiller-real-"))
    data = write_synthetic_glue(d/"data", "MNLI", n_train=512, n_dev=64)
    sets = [f"data_root={data}", "teacher=random:bert-base", "student=random:tinybert-4l-312", f"tokenizer={TOKENIZER}",
            "teacher_finetune_steps=20", "teacher_batch_size=32", "teacher_dev_check=false", "batch_size=32", "gradient_accumulation_steps=1",
            "eval_batch_size=64", "steps=60", "checkpoint_every=30", "num_workers=2", "mixed_precision=bf16"]
    r = dict(config="distiller/glue_mnli.yaml", sets=sets, **_run("distiller", CONFIGS/"distiller"/"glue_mnli.yaml", d/"run", sets, d, d/"home", timeout))
    if (d/"run"/"summary.json").exists(): r["summary"] = json.loads((d/"run"/"summary.json").read_text())
    return r

def environment()->dict:
    import importlib.metadata as md, torch
    v = {}
    for p in ("torch", "transformers", "diffusers", "accelerate", "peft", "timm", "safetensors", "numpy"):
        try: v[p] = md.version(p)
        except md.PackageNotFoundError: v[p] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True) \
        if gpu else None
    return dict(gpu=gpu, nvidia_smi=smi.stdout.strip() if smi else None, cuda=torch.version.cuda, versions=v, cpus=os.cpu_count(),
                date=time.strftime("%Y-%m-%d"))

def dryruns_part(cases:list|None, out:Path, timeout:float)->tuple:
    "`gpu_dry_runs` in a child process (a hang or a crash of the GPU stack stops there): (what finished, read back from its file; its warnings)."
    f = out/"dryruns.json"; names = json.dumps(cases)
    code = f"import json; from distill_nb.plan import gpu_dry_runs; gpu_dry_runs(json.loads({names!r}), out={str(f)!r})"
    t0 = time.time()
    try: p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout); tail = p.stderr[-3000:]
    except subprocess.TimeoutExpired: p, tail = None, f"timeout after {timeout:.0f} s"
    err = p.stderr if p is not None else ""
    (out/"dryruns_stderr.txt").write_text(err[-200_000:])      # the warnings, e.g. which op has no deterministic CUDA kernel
    recs = json.loads(f.read_text()) if f.exists() else []
    warns = sorted({l.strip() for l in err.splitlines() if "Warning" in l})[:50]
    print(f"dry runs: {len(recs)} cases in {time.time() - t0:.0f} s", flush=True)
    from distill_nb.plan import GPU_DRY_RUNS
    return recs + ([{"case": "-", "phase": "-", "batch": 0, "error": tail}] if len(recs) < len(cases or GPU_DRY_RUNS) else []), warns

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_checks"))
    ap.add_argument("--parts", default="launchers,realsize,dryruns", help="comma-separated: launchers, realsize, dryruns")
    ap.add_argument("--papers", default=",".join(LAUNCH_JOBS), help="the launchers to run (comma-separated)")
    ap.add_argument("--cases", default="", help="GPU_DRY_RUNS cases (comma-separated; default all)")
    ap.add_argument("--timeout", type=float, default=200, help="seconds per launcher run (the dry runs get 2x)")
    ap.add_argument("--merge", type=Path, help="add the planner's peaks to a finished gpu_checks.json and write results/device/<gpu>.json")
    a = ap.parse_args(argv)
    if a.merge: return merge(a.merge, [c for c in a.cases.split(",") if c] or None)
    a.out.mkdir(parents=True, exist_ok=True); parts = set(a.parts.split(",")); res = dict(environment=environment()); lock = threading.Lock()
    def save():
        with lock: (a.out/"gpu_checks.json").write_text(json.dumps(res, indent=1, default=str))
    save(); print(json.dumps(res["environment"]), flush=True)
    res["launchers"] = {}
    def lj(p):
        r = launcher_job(p, a.timeout); res["launchers"][p] = r; save()
        print(f"launcher {p}: ok={r['ok']} ref {r['ref']['rc']} ({r['ref']['wall_s']} s), killed {r['killed']['rc']}, resumed {r['resumed']['rc']}, "
              f"weights {r.get('weights', {}).get('bit_identical')} (max diff {r.get('weights', {}).get('max_abs_diff')})", flush=True)
    def rj():
        res["realsize"] = r = realsize_job(4 * a.timeout); save()
        print(f"realsize distiller: rc {r['rc']} in {r['wall_s']} s", flush=True)
    ts = ([threading.Thread(target=lj, args=(p,)) for p in a.papers.split(",") if p] if "launchers" in parts else []) + \
         ([threading.Thread(target=rj)] if "realsize" in parts else [])
    for t in ts: t.start()
    for t in ts: t.join()
    if "dryruns" in parts:
        res["dryruns"], res["dryrun_warnings"] = dryruns_part([c for c in a.cases.split(",") if c] or None, a.out, 2 * a.timeout); save()
        from distill_nb.plan import gpu_dry_run_table
        print(gpu_dry_run_table(res["dryruns"]), flush=True)

def device_checks(res:dict, gpu_mem:float=80)->dict:
    "The record's checks, each a guard (the code behaves on this device; a failing one is a bug, never a verdict). The planner's ratio is reported, not checked."
    lj, rs, dr = res.get("launchers", {}), res.get("realsize", {}), res.get("dryruns", [])
    ok = [r for r in dr if "error" not in r]; GiB = 2 ** 30
    def g(passed, note): return {"role": "guard", "passed": bool(passed), "note": note}
    good = [p for p, j in lj.items() if j["ok"] and j.get("weights", {}).get("bit_identical")]
    fit = [r for r in ok if r["peak_reserved"] < gpu_mem * GiB]
    return {"launchers end, die at their hook and resume to the uninterrupted weights": g(lj and len(good) == len(lj), f"{len(good)} of {len(lj)}: {', '.join(good)}"),
            "Distiller's launcher at real architectures ends": g(rs.get("rc") == 0, f"exit {rs.get('rc')} in {rs.get('wall_s')} s"),
            "every dry-run case ran": g(dr and len(ok) == len(dr), f"{len(ok)} of {len(dr)}"),
            "every checkpoint reloads the state exactly": g(ok and all(r["reload_equal"] for r in ok), f"{sum(r['reload_equal'] for r in ok)} of {len(ok)}"),
            f"every case fits {gpu_mem:g} GiB at its per-device micro-batch": g(ok and len(fit) == len(ok), f"{len(fit)} of {len(ok)} (peak reserved)")}

def merge(path:Path, cases:list|None=None):
    "Add `plan_dry`'s peak and planned / measured to each finished dry run (or only to `cases`); write results/device/<gpu>.json."
    from distill_nb.plan import plan_dry, _dry_config, gpu_dry_run_table
    res = json.loads(Path(path).read_text())
    for r in res.get("dryruns", []):
        if "error" in r or (cases and r["case"] not in cases): continue
        r["config"] = str(Path(r["config"]).relative_to(Path(r["config"]).parents[1])) if Path(r["config"]).is_absolute() else r["config"]
        p = plan_dry(r["paper"], _dry_config(r["paper"], CONFIGS/r["config"], r["sets"]), r["phase"], r["batch"], r["measured"])
        if p["plan"]["note"] and not p["planned"]: print(f"{r['case']}: not planned here ({p['plan']['note']})"); continue
        r.update(p, planned_with=f"torch {__import__('torch').__version__}, on CPU")
    res["checks"] = device_checks(res)
    name = (res["environment"]["gpu"] or "cpu").lower().replace("nvidia ", "").replace(" ", "_")
    f = ROOT/"results"/"device"/f"{name}.json"; f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(res, indent=1, default=str) + "\n"); print(gpu_dry_run_table(res.get("dryruns", []))); print(f"wrote {f}")

if __name__ == "__main__": main()
