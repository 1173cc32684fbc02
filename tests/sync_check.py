"""The test command's first step: the package, the notebooks and README.md are in sync.

1. `nbdev_export` run on a copy of the tree changes nothing in distill_nb/ (the package was exported, not hand-edited);
2. `nbdev_clean` run on a copy of nbs/ changes no notebook (notebooks are committed clean);
3. README.md equals the markdown rendered from nbs/index.ipynb (run `distill_nb readme` to refresh it);
4. the layout has no pyproject.toml (settings.ini + setup.py only);
5. every notebook carries its outputs (run `distill_nb outputs`): at least one, at most 300 KB, no stderr, no local path.
Works on a dirty checkout too: it compares copies, never the git index.
"""
import shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def _tree(d: Path, pat: str) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob(pat)) if "__pycache__" not in p.parts}

def main() -> int:
    problems = []
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        for f in ("settings.ini", "setup.py", "README.md"): shutil.copy(ROOT/f, t/f)
        shutil.copytree(ROOT/"nbs", t/"nbs"); shutil.copytree(ROOT/"distill_nb", t/"distill_nb")
        subprocess.run([BIN/"nbdev_export"], cwd=t, check=True)
        a, b = _tree(ROOT/"distill_nb", "*.py"), _tree(t/"distill_nb", "*.py")
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diff: problems.append(f"nbdev_export changes {diff}: run `nbdev_export` and commit (never edit distill_nb/*.py by hand)")
        subprocess.run([BIN/"nbdev_clean"], cwd=t, check=True)
        a, b = _tree(ROOT/"nbs", "*.ipynb"), _tree(t/"nbs", "*.ipynb")
        diff = sorted(k for k in a if a[k] != b.get(k))
        if diff: problems.append(f"nbdev_clean changes {diff}: run `nbdev_clean` and commit clean notebooks")
    from distill_nb.records import notebook_markdown
    if (ROOT/"README.md").read_text() != notebook_markdown(ROOT/"nbs"/"index.ipynb"):
        problems.append("README.md is stale: run `distill_nb readme` (renders nbs/index.ipynb) and commit it")
    from distill_nb.records import output_problems
    import json
    for nb in sorted((ROOT/"nbs").glob("*.ipynb")):
        d = json.loads(nb.read_text()); n = sum(len(c.get("outputs", [])) for c in d["cells"])
        probs = output_problems(d) + ([] if n else ["no outputs"])
        if probs: problems.append(f"{nb.name}: {'; '.join(probs)}: run `distill_nb outputs {nb.relative_to(ROOT)}` and commit it")
    if (ROOT/"pyproject.toml").exists(): problems.append("pyproject.toml exists: the layout is settings.ini + setup.py")
    for p in problems: print("sync check FAILED:", p, file=sys.stderr)
    if not problems: print("sync check: package, notebooks and README.md are in sync")
    return 1 if problems else 0

if __name__ == "__main__": sys.exit(main())
