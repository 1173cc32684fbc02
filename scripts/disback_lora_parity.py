#!/usr/bin/env python
"""DisBack: do the ring experiments keep their verdicts when the degradation path is stored as LoRA adapters?

    python scripts/disback_lora_parity.py run --rank 8 --raw /tmp/parity      # the experiments, path patched to LoRA (minutes)
    python scripts/disback_lora_parity.py summarise --raw /tmp/parity           # vs the committed records -> results/disback/checks/

`run` re-runs each experiment exactly as registered (its protocol's seeds and budgets) with `record_degradation`
replaced by `record_lora_degradation(..., rank=r)` (distill_nb.disback_full): the auxiliary model of Algorithm 1 is a
rank-r LoRA on the frozen teacher, at the same learning rate and step count. Nothing is written to results/ by `run`;
`summarise` puts each raw record beside the committed full-copy record of the same experiment (verdict, every check)."""
import argparse, json, sys, time
from pathlib import Path

EXPERIMENTS = ("mechanism", "ring_convergence")

def run(raw:Path, rank:int, names:list[str]):
    import distill_nb.disback as db
    from distill_nb.disback_full import record_lora_degradation
    from distill_nb.records import _json_default
    db.record_degradation = lambda teacher, generator, **kw: record_lora_degradation(teacher, generator, rank=rank, **kw)
    raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.time(); r = getattr(db, f"{name}_experiment")()
        d = r.to_dict() | {"parity_wall_s": time.time() - t0, "lora_rank": rank}
        (raw/f"{name}_r{rank}.json").write_text(json.dumps(d, default=_json_default, indent=1))
        print(f"{name} (LoRA rank {rank}): {r.verdict}; {r.summary} [{time.time() - t0:.0f} s]", flush=True)

def _checks(rec:dict)->dict:
    keep = ("role", "primary", "passed", "effect", "lo", "hi", "p", "n", "value", "threshold", "unit")
    return {k: {f: c.get(f) for f in keep} for k, c in rec["checks"].items()}

def summarise(raw:Path, out:Path):
    from distill_nb.records import results_dir
    rows = []
    for f in sorted(raw.glob("*_r*.json")):
        lo = json.loads(f.read_text()); key = lo["experiment"] + ("" if lo["scale"] == "quick" else f".{lo['scale']}")
        full = json.loads((results_dir()/"disback"/f"{key}.json").read_text())
        if full["protocol_hash"] != lo["protocol_hash"]: sys.exit(f"{f}: protocol {lo['protocol_hash']} is not the committed record's {full['protocol_hash']}; re-run `run`")
        rows.append({"experiment": key, "lora_rank": lo["lora_rank"], "seeds": lo["seeds"], "same_verdict": lo["verdict"] == full["verdict"],
                     "full": {"verdict": full["verdict"], "summary": full["summary"], "checks": _checks(full)},
                     "lora": {"verdict": lo["verdict"], "summary": lo["summary"], "checks": _checks(lo), "wall_s": round(lo["parity_wall_s"])},
                     "code_hash": lo["code_hash"], "versions": lo.get("versions")})
    out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows: print(f"{r['experiment']}: full {r['full']['verdict']!r}, LoRA r={r['lora_rank']} {r['lora']['verdict']!r}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("run", "summarise"))
    ap.add_argument("--raw", type=Path, required=True, help="folder of the raw LoRA-path records")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the path's adapters (run)")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma-separated experiments (run; default {','.join(EXPERIMENTS)})")
    ap.add_argument("--out", type=Path, default=Path("results/disback/checks/lora_path_parity.json"))
    a = ap.parse_args()
    bad = [n for n in a.only.split(",") if n not in EXPERIMENTS]
    if bad: ap.error(f"--only {bad}: choose from {', '.join(EXPERIMENTS)}")
    run(a.raw, a.rank, a.only.split(",")) if a.step == "run" else summarise(a.raw, a.out)
