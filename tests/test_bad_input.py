"""Bad input to the launcher stops before any compute, with one line `error: <what>; <how to fix>` and exit status 2.

Each case checks the exact message and that nothing was computed or written: no output folder, no checkpoint, no
teacher in an isolated `DISTILL_NB_HOME`. To keep the time small, most cases run in one driver process that calls
`distill_nb.launch.main` once per command line; two tests run the real command (`python -m` and `torchrun`)."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
from distill_nb.launch import run_launch, launch_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT/"configs"/"hinton"/"tiny.yaml"

DRIVER = r'''
import contextlib, dataclasses, io, json, sys
import distill_nb.hinton_full as h
from distill_nb.launch import main
f = {x.name: x for x in dataclasses.fields(h.HintonFullConfig)}
info = {"domains": "domain" in f["steps"].metadata, "resume_safe": list(h.HintonFullConfig.resume_safe)}
res = []
for argv in json.loads(sys.argv[1]):
    if argv[0] == "needs-domains":
        if not info["domains"]: res.append(None); continue
        argv = argv[1:]
    if argv[0] == "strip-config":                  # make the checkpoints look like ones written before configs were stored
        for p in __import__("pathlib").Path(argv[1]).rglob("state.json"):
            s = json.loads(p.read_text()); s.pop("config", None); s.pop("config_class", None); p.write_text(json.dumps(s))
        res.append(None); continue
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err): main(argv); code = 0
    except SystemExit as e: code = e.code
    except Exception as e: code = f"raised {type(e).__name__}"
    res.append([code, err.getvalue()])
print(json.dumps({"info": info, "results": res}))
'''

def env(home, **kw):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DISTILL_NB_PROGRESS": "0", "OMP_NUM_THREADS": "1",
            "DISTILL_NB_HOME": str(home), **{k: str(v) for k, v in kw.items()}}

def drive(cases, home, cwd):
    "Run `main(argv)` for each case in one fresh process; returns (info, [[exit status, stderr] or None, ...])."
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], env=env(home), cwd=cwd, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, launch_report(r)
    d = json.loads(r.stdout.strip().splitlines()[-1]); return d["info"], d["results"]

def teachers(home): return sorted(p.name for p in (Path(home)/"cache"/"models").glob("*.safetensors"))

def one_line_error(res, want:str):
    "Exit status 2 and stderr exactly `error: <want...>` on one line."
    code, err = res
    assert code == 2, res
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert want in err, (want, err)

def hinton(*args, out=None): return ["hinton", "--config", str(TINY), *(["--out", str(out)] if out else []), *args]
def distiller(*args, out=None): return ["distiller", "--config", str(ROOT/"configs"/"distiller"/"tiny.yaml"), "--out", str(out), *args]

@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    "All the validation cases, run once: (tmp dir, info, {name: result})."
    d = tmp_path_factory.mktemp("bad"); o = d/"out"
    (d/"syntax.yaml").write_text("steps: 3\nteacher: [16, 32\nlr: 1\n")
    (d/"list.yaml").write_text("- steps: 3\n")
    (d/"scalar.yaml").write_text("42\n")
    (d/"file").write_text("")
    cases = {
        "dotted":        hinton("--set", "steps.x=1", out=o),
        "no_equals":     hinton("--set", "steps", out=o),
        "bad_yaml_value": hinton("--set", "teacher=[16, 32", out=o),
        "steps_ten":     hinton("--set", "steps=ten", out=o),
        "teacher_int":   hinton("--set", "teacher=5", out=o),
        "mixed_fp8":     hinton("--set", "mixed_precision=fp8", out=o),
        "unknown_key":   hinton("--set", "teacher_stpes=1", out=o),
        "syntax":        ["hinton", "--config", str(d/"syntax.yaml"), "--out", str(o)],
        "list":          ["hinton", "--config", str(d/"list.yaml"), "--out", str(o)],
        "scalar":        ["hinton", "--config", str(d/"scalar.yaml"), "--out", str(o)],
        "missing_file":  ["hinton", "--config", str(d/"nope.yaml"), "--out", str(o)],
        "unknown_paper": ["hintn", "--config", str(TINY), "--out", str(o)],
        "out_under_file": hinton(out=d/"file"/"run"),
        "allow_unknown": hinton("--allow-change", "stpes", out=o),
        "allow_unsafe":  hinton("--allow-change", "lr", out=o),
        "debug":         hinton("--set", "steps=ten", "--debug", out=o),
        "steps_0":       ["needs-domains", *hinton("--set", "steps=0", out=o)],
        "every_0":       ["needs-domains", *hinton("--set", "checkpoint_every=0", out=o)],
        "batch_0":       ["needs-domains", *hinton("--set", "batch_size=0", out=o)],
        "lr_neg":        ["needs-domains", *hinton("--set", "lr=-1", out=o)],
        "alpha_2":       ["needs-domains", *hinton("--set", "alpha=2", out=o)],
        "T_0":           ["needs-domains", *hinton("--set", "T=0", out=o)],
        "pipeline_aug_p": distiller("--set", "pipeline.aug_p=2", out=o),          # a paper config's own validation
        "pipeline_inter": distiller("--set", "pipeline.intermediate=msee", out=o),
    }
    if os.geteuid() != 0:                          # root writes anywhere: a read-only folder needs a normal user
        (d/"ro").mkdir(); (d/"ro").chmod(0o500); cases["out_read_only"] = hinton(out=d/"ro"/"run")
    info, res = drive(list(cases.values()), d/"home", d)
    yield d, info, dict(zip(cases, res))
    if (d/"ro").exists(): (d/"ro").chmod(0o700)

EXPECT = {
    "dotted": "error: --set steps.x=1: steps is 20, not a mapping with a key 'x'; write --set steps=VALUE",
    "no_equals": "error: --set expects KEY=VALUE, got 'steps'; write it like --set steps=100",
    "bad_yaml_value": "error: --set teacher=[16, 32: the value is not valid YAML (",
    "steps_ten": "error: HintonFullConfig (tiny.yaml).steps: expected an integer, got 'ten'; set steps to an integer",
    "teacher_int": "error: HintonFullConfig (tiny.yaml).teacher: expected a list, got 5; set teacher to a list",
    "mixed_fp8": "error: HintonFullConfig (tiny.yaml).mixed_precision: expected one of ['no', 'fp16', 'bf16'], got 'fp8'; set mixed_precision to one of",
    "unknown_key": "error: HintonFullConfig (tiny.yaml): unknown key 'teacher_stpes'; Did you mean 'teacher_steps'? Valid keys: dataset,",
    "syntax": "syntax.yaml is not valid YAML at line 3, column 3 (expected ',' or ']', but got ':'); fix the syntax there",
    "list": "list.yaml must be a mapping of keys to values, not a list; write it as `key: value` lines",
    "scalar": "scalar.yaml must be a mapping of keys to values, not a number;",
    "missing_file": "nope.yaml does not exist; the shipped ones are under configs/hinton/",
    "unknown_paper": "error: unknown paper 'hintn'; valid papers: hinton,",
    "out_under_file": "/file/run is not writable (Not a directory); choose another folder or fix its permissions",
    "allow_unknown": "error: --allow-change stpes: HintonFullConfig has no key 'stpes'; valid keys: dataset,",
    "allow_unsafe": "error: --allow-change lr: lr is not safe to change on resume; HintonFullConfig allows only:",
    "pipeline_aug_p": "error: DistillerPipeline.aug_p must be in [0, 1], got 2.0; set aug_p in [0, 1]",
    "pipeline_inter": "error: unknown intermediate (DistillerPipeline.intermediate) 'msee' (did you mean 'mse'?); valid: none, mse,",
    "out_read_only": "/ro/run is not writable (Permission denied); choose another folder",
}
DOMAIN_EXPECT = {
    "steps_0": "error: HintonFullConfig (tiny.yaml).steps: 0 is not > 0; set steps to a value > 0",
    "every_0": "error: HintonFullConfig (tiny.yaml).checkpoint_every: 0 is not > 0; set checkpoint_every to a value > 0",
    "batch_0": "error: HintonFullConfig (tiny.yaml).batch_size: 0 is not > 0; set batch_size to a value > 0",
    "lr_neg": "error: HintonFullConfig (tiny.yaml).lr: -1.0 is not > 0; set lr to a value > 0",
    "alpha_2": "error: HintonFullConfig (tiny.yaml).alpha: 2.0 is not in [0, 1]; set alpha to a value in [0, 1]",
    "T_0": "error: HintonFullConfig (tiny.yaml).T: 0.0 is not > 0; set T to a value > 0",
}

def test_validation_errors_are_one_line_and_stop_before_compute(validation):
    d, info, res = validation
    for name, want in EXPECT.items():
        if name in res: one_line_error(res[name], want)
    assert not (d/"out").exists() and teachers(d/"home") == []          # nothing computed, nothing written

def test_domain_errors(validation):
    d, info, res = validation
    if not info["domains"]: pytest.skip("HintonFullConfig declares no domains yet (nbs/08_hinton.ipynb)")
    for name, want in DOMAIN_EXPECT.items(): one_line_error(res[name], want)
    assert not (d/"out").exists() and teachers(d/"home") == []

def test_debug_shows_the_exception(validation):
    assert validation[2]["debug"][0] == "raised ConfigError"

def test_resume_guard(tmp_path):
    o, home = tmp_path/"run", tmp_path/"home"; ck = o/"checkpoints"
    info, (first, changed, steps_only, allowed, _, arch, fresh) = drive([
        hinton("--set", "steps=10", out=o),
        hinton("--set", "steps=20", "--set", "lr=0.5", out=o),
        hinton("--set", "steps=20", out=o),
        hinton("--set", "steps=20", "--allow-change", "steps", out=o),
        ["strip-config", str(ck)],
        hinton("--set", "steps=20", "--set", "student=[16, 9, 4]", out=o),
        hinton("--set", "steps=10", "--no-resume", out=o),
    ], home, tmp_path)
    assert first == [0, ""], first
    one_line_error(changed, f"error: cannot resume from {ck}/checkpoint-00000009: the config changed (lr 0.001 → 0.5, steps 10 → 20); "
                            "resume with the original config, pass --allow-change KEY for keys that are safe to change (")
    assert changed[1].endswith("), or use --no-resume / a new --out\n")
    one_line_error(steps_only, "the config changed (steps 10 → 20);")
    assert len(teachers(home)) == 1                                      # no teacher was trained at lr 0.5
    if "steps" in info["resume_safe"]:
        assert allowed == [0, ""], allowed
        assert json.loads((o/"summary.json").read_text())["resumed_from"] == 9
    else: assert allowed[0] == 2 and "is not safe to change on resume" in allowed[1]
    code, err = arch                                                     # an old checkpoint (no config): warn, then the size mismatch
    assert code == 2 and "stores no config (written by an older distill_nb); resuming without checking it" in err, arch
    assert ("error: checkpoint " in err and "module 'student' does not match the model being resumed (Error(s) in loading state_dict "
            "for Sequential: size mismatch for 0.weight: copying a param with shape torch.Size([8, 16]) from checkpoint" in err), err
    code, err = fresh
    assert code == 0 and err.startswith(f"--no-resume: writing to the new folder {o}-") and err.endswith(f"({o} is kept)\n"), fresh
    new = Path(err.split("new folder ")[1].split(" (")[0])
    assert json.loads((new/"summary.json").read_text())["resumed_from"] is None

def test_real_command_exit_status_2_without_traceback(tmp_path):
    r = run_launch("hinton", TINY, tmp_path/"o", 1, ["steps=ten"], home=tmp_path/"home", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == "error: HintonFullConfig (tiny.yaml).steps: expected an integer, got 'ten'; set steps to an integer\n"
    assert not (tmp_path/"o").exists() and teachers(tmp_path/"home") == []

def test_torchrun_validates_before_any_process_group(tmp_path):
    r = run_launch("hinton", TINY, tmp_path/"o", 2, ["steps.x=1"], home=tmp_path/"home", timeout=300)
    assert r.returncode != 0
    line = "error: --set steps.x=1: steps is 20, not a mapping with a key 'x'; write --set steps=VALUE\n"
    assert r.stderr.count(line) >= 1, launch_report(r)                   # a worker prints its one line (the runner may stop the other first)
    assert "Traceback" not in r.stderr.split(line)[0]                    # no worker traceback before it
    assert not (tmp_path/"o").exists() and teachers(tmp_path/"home") == []
