"""Re-key records made under the old code hash (sha256 of the module's bytes) to `source_hash` (its tokens).

For each record, find the exact module text it was made with: the working tree's, or a version in the module's git
history whose byte hash equals the record's. If that text's token hash equals the current module's, the record was made
by the code that is there now (up to comments and blank lines), and its `code_hash` is rewritten. Otherwise it is left
alone, and `distill_nb results` calls it stale, as before. Nothing else in the record changes.

    python scripts/rehash_records.py [--dry-run]
"""
import argparse, hashlib, re, subprocess
from pathlib import Path

from distill_nb.core import repo_root
from distill_nb.records import _module_file, code_hash, source_hash

def versions(root:Path, rel:str):
    "(byte hash, text) of the working tree's module and of every committed version of it."
    here = (root/rel).read_bytes(); yield hashlib.sha256(here).hexdigest()[:12], here.decode()
    commits = subprocess.run(["git", "-C", str(root), "log", "--format=%H", "--", rel], capture_output=True, text=True).stdout.split()
    for c in commits:
        b = subprocess.run(["git", "-C", str(root), "show", f"{c}:{rel}"], capture_output=True).stdout
        if b: yield hashlib.sha256(b).hexdigest()[:12], b.decode()

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    a = ap.parse_args(); root = repo_root()
    for f in sorted((root/"results").glob("*/*.json")):
        text = f.read_text(); m = re.search(r'"code_hash": "([0-9a-f]{12})"', text)
        if not m: continue
        paper, old = f.parent.name, m.group(1); now = code_hash(paper)
        if old == now: print(f"{f.relative_to(root)}: current"); continue
        rel = str(_module_file(paper).relative_to(root))
        src = next((t for h, t in versions(root, rel) if h == old), None)
        if src is None: print(f"{f.relative_to(root)}: no version of {rel} has byte hash {old}; left stale"); continue
        if source_hash(src) != now: print(f"{f.relative_to(root)}: made by different code; left stale"); continue
        print(f"{f.relative_to(root)}: {old} -> {now} (same tokens)")
        if not a.dry_run: f.write_text(text.replace(m.group(0), f'"code_hash": "{now}"', 1))

if __name__ == "__main__": main()
