"""Every committed fixture is what a cold build of its config writes, bit for bit.

A fixture (`fixtures/<name>-<hash>.safetensors`) lets a fresh machine skip training a teacher: `make reproduce` reads it,
while `distill_nb reproduce --cold` rebuilds it from its config. If the two differ, a record depends on whether the machine
had the fixtures; DisWOT's teacher fixture once differed from its cold build by up to 5.6 in a logit, and D1-D5 moved.

- The fast tests check that each fixture's file name is the hash of the config stored in its metadata, and that a rebuild
  recipe below maps that config back to the builder's own cache key (with fixtures on, in an empty home, the builder must
  load the fixture and build nothing).
- The slow test (`make slow`) rebuilds every fixture in one empty home with the fixtures bypassed, after perturbing the
  global RNG, and compares every tensor bitwise with the committed file. Regenerate a fixture by copying the file a cold
  build wrote under `$DISTILL_NB_HOME/cache/models/`, and bump the builder's `cache_version` when its code changes.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distill_nb.core import config_hash, load_tensors, repo_root

FIXTURES = sorted((repo_root()/"fixtures").glob("*.safetensors"))

# Fixtures known to differ from their cold build, and the issue that regenerates them together with the records built on
# them. Any other mismatch fails the slow test, and so does one of these that starts to match (the list cannot go stale).
KNOWN_STALE = {
}

def meta(p:Path)->tuple[str, object]:
    with safe_open(str(p), "pt") as f: md = f.metadata() or {}
    return md.get("name"), json.loads(md.get("config", "null"))

def _diswot_teacher(c):
    from distill_nb.diswot import quick_teacher, QuickTeacherConfig, AugTeacherConfig
    c = {k: v for k, v in c.items() if k != "cache_version"}
    return quick_teacher((AugTeacherConfig if "augment" in c else QuickTeacherConfig)(**c))

def _tweet_cfg(c):
    from distill_nb.distiller import TweetTeacherConfig
    return TweetTeacherConfig(**c["teacher"])

def _recipes()->dict:
    "Fixture name -> a function rebuilding it from the config in its metadata (through the paper's public builder)."
    from distill_nb import disback, distiller, hyper_sd, similar
    return {
        "disback-digits-classifier": disback.digits_classifier,
        "disback-digits-teacher": disback.digits_teacher,
        "disback-ring-teacher": disback.ring_teacher,
        "distiller-tweets-teacher": lambda c: distiller.teacher_outputs(c["n_cache"], _tweet_cfg(c), c["layers"]),
        "distiller-tweets-aug-logits": lambda c: distiller.augmented_teacher_logits(
            c["n"], _tweet_cfg(c), c["augmenters"], c["aug_p"], c["n_aug"], c["seed"]),
        "diswot-fashion-teacher": _diswot_teacher,
        "hyper_sd-digits-classifier": lambda c: hyper_sd.digits_classifier(c["steps"]),
        "hyper_sd-digits-segmenter": lambda c: hyper_sd.digits_segmenter(c["steps"]),
        "hyper_sd-digits-teacher": lambda c: hyper_sd.digits_teacher(hyper_sd.DigitsTeacherConfig(**c)),
        "hyper_sd-reward-classifier": lambda c: hyper_sd.reward_classifier(c["steps"]),
        "hyper_sd-ring-teacher": lambda c: hyper_sd.ring_teacher(c["seed"], c["steps"]),
        "similar-mnist-means": lambda c: similar.mnist_source(),
    }

def test_the_fixtures_are_found():
    "The glob sees exactly the fixture files git tracks (none lost to a wrong path or an LFS pointer checkout)."
    import subprocess
    assert FIXTURES, "no fixtures under fixtures/"
    git = subprocess.run(["git", "-C", str(repo_root()), "ls-files", "fixtures/*.safetensors"], capture_output=True, text=True)
    if git.returncode: pytest.skip("not a git checkout")
    assert {p.name for p in FIXTURES} == {Path(l).name for l in git.stdout.split()}, "fixtures/ differs from the tracked fixtures"
    assert all(p.stat().st_size > 1024 for p in FIXTURES), "a fixture is a stub (an LFS pointer?)"
    assert set(KNOWN_STALE) <= {p.name for p in FIXTURES}, "KNOWN_STALE names a fixture that is gone"

@pytest.mark.parametrize("p", FIXTURES, ids=lambda p: p.stem)
def test_fixture_name_is_the_hash_of_its_config(p):
    name, cfg = meta(p)
    assert name and cfg is not None, f"{p.name}: no name/config metadata"
    assert p.name == f"{name}-{config_hash(cfg)}.safetensors", f"{p.name}: its metadata hashes to {config_hash(cfg)}"
    assert name in _recipes(), f"{p.name}: no rebuild recipe; add one to tests/test_fixtures.py"

@pytest.mark.parametrize("p", FIXTURES, ids=lambda p: p.stem)
def test_recipe_reaches_the_fixture(p, monkeypatch, tmp_path):
    "With the fixtures on, the recipe's builder loads this very fixture: nothing is built in an empty home."
    name, cfg = meta(p)
    if name.startswith("distiller-"): pytest.skip("loads MiniLM (covered by the slow rebuild)")
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path)); monkeypatch.delenv("DISTILL_NB_NO_FIXTURES", raising=False)
    import distill_nb.core as core
    seen = []
    real = core._lookup
    def spy(dirs, fn, verbose):
        out = real(dirs, fn, verbose); seen.append((fn, out is not None)); return out
    monkeypatch.setattr(core, "_lookup", spy)
    def no_build(*a, **k): raise AssertionError(f"{p.name}: the recipe asked for an entry that is not a fixture: {seen[-1][0]}")
    monkeypatch.setattr(core, "save_tensors", no_build)
    _recipes()[name](cfg)
    assert (p.name, True) in seen, f"{p.name}: the recipe never read it (read {[f for f, _ in seen]})"

def _perturb():
    torch.manual_seed(1234); torch.rand(11); import random, numpy as np; random.seed(5); np.random.seed(6)

@pytest.mark.slow
def test_every_fixture_equals_its_cold_build(monkeypatch, tmp_path):
    "Rebuild every fixture in one empty home (fixtures bypassed), then compare each file tensor by tensor."
    monkeypatch.setenv("DISTILL_NB_HOME", str(tmp_path)); monkeypatch.setenv("DISTILL_NB_NO_FIXTURES", "1")
    bad, stale = [], []
    for p in FIXTURES:
        name, cfg = meta(p); built = tmp_path/"cache"/"models"/p.name
        if not built.exists(): _perturb(); _recipes()[name](cfg)
        assert built.exists(), f"{p.name}: the recipe built something else"
        a, b = load_tensors(p), load_tensors(built)
        diff = sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
        if p.name in KNOWN_STALE: stale.append(p.name) if diff else bad.append(f"{p.name} now matches: drop it from KNOWN_STALE")
        elif diff: bad.append(f"{p.name}: {len(diff)} tensors differ, e.g. {diff[:3]}, max |Δ| "
                              f"{max(((a[k] - b[k]).abs().max().item() for k in diff if k in a and k in b), default=float('nan')):.3g}")
    assert not bad, "fixtures differ from their cold builds:\n" + "\n".join(bad)
    assert sorted(stale) == sorted(KNOWN_STALE)
