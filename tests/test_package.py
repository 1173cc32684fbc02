"""The package installs as users install it: a built wheel holds every module, and a plain (non-editable)
`pip install .` into a fresh venv gives a working `distill_nb --help`."""
import os, subprocess, sys, venv, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_wheel_and_plain_install(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path/"dist"), str(ROOT)],
                   check=True, capture_output=True)
    whl = next((tmp_path/"dist").glob("distill_nb-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    modules = {f"distill_nb/{p.name}" for p in (ROOT/"distill_nb").glob("*.py")}
    assert modules <= names, f"wheel lacks {sorted(modules - names)}"
    assert any(n.endswith("entry_points.txt") for n in names)
    # a fresh venv: the wheel itself, the dependencies borrowed from the test venv (no network, no editable finder)
    env_dir = tmp_path/"venv"; venv.create(env_dir, with_pip=True)
    py, bin_ = env_dir/"bin"/"python", env_dir/"bin"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)], check=True, capture_output=True)
    site = next(env_dir.glob("lib/python*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site/"zz_deps.pth").write_text("\n".join(deps) + "\n")   # plain path entries: the editable .pth hooks do not run
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([py, "-c", "import distill_nb.cli, distill_nb; print(distill_nb.__file__)"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(env_dir) in out.stdout, f"imported from {out.stdout} instead of the installed wheel"
    h = subprocess.run([bin_/"distill_nb", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert h.returncode == 0 and "reproduce" in h.stdout and "hinton" in h.stdout, h.stderr
