"""Every cached builder is seeded from its config: the same config gives the same bytes whatever the process's RNG state.

Each test builds a cached artefact twice, each time in an empty `DISTILL_NB_HOME` with the committed fixtures bypassed
(`DISTILL_NB_NO_FIXTURES=1`, else a fixture-backed builder would load and the test would be vacuous), after perturbing the
global RNG states (python, numpy, torch) differently, and compares bitwise: the returned tensors and every file the builder
(and the builders it calls) wrote to the cache. Configs are tiny (a few training steps) so the file runs in about a minute.
"""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill_nb.core import cached_tensors, load_tensors, seed_everything


def _perturb_a():
    torch.manual_seed(1); torch.rand(7); random.seed(2); np.random.seed(3)

def _perturb_b():
    torch.manual_seed(11); torch.rand(3); torch.randn(5, 5); random.seed(12); random.random(); np.random.seed(13); np.random.rand(4)

def _tensors(obj, prefix:str="out")->dict:
    "Every tensor in a builder's return value (modules by state dict; tokenizers and strings ignored)."
    if isinstance(obj, torch.Tensor): return {prefix: obj}
    if isinstance(obj, nn.Module): return {f"{prefix}.{k}": v for k, v in obj.state_dict().items()}
    if isinstance(obj, dict): return {k2: v2 for k, v in obj.items() for k2, v2 in _tensors(v, f"{prefix}.{k}").items()}
    if isinstance(obj, (tuple, list)): return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _tensors(v, f"{prefix}[{i}]").items()}
    if hasattr(obj, "model") and hasattr(obj, "class_means"): return _tensors({"model": obj.model, "class_means": obj.class_means}, prefix)
    return {}

def build_in_fresh_home(monkeypatch, home:Path, perturb, build, prepare=None)->dict:
    "Run `build()` in the empty home `home` after `prepare()` and `perturb()`: {name: tensor} of its result and of every cache file written."
    home.mkdir(parents=True)
    monkeypatch.setenv("DISTILL_NB_HOME", str(home)); monkeypatch.setenv("DISTILL_NB_NO_FIXTURES", "1")
    if prepare is not None: prepare()
    perturb(); out = _tensors(build())
    files = sorted((home/"cache"/"models").glob("*.safetensors"))
    assert files, f"the builder wrote nothing under {home}/cache/models: it did not build (a fixture or an in-memory cache?)"
    for p in files: out.update({f"{p.name}:{k}": v for k, v in load_tensors(p).items()})
    return out

def differences(a:dict, b:dict)->list[str]:
    "Names whose tensors differ between two builds (or that only one build has)."
    diff = sorted(set(a) ^ set(b))
    return diff + [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]

def check_seeded(monkeypatch, tmp_path:Path, build, min_files:int=1,
                 prepare=None): # builds the inputs first (e.g. a teacher), so that their own seeding cannot mask a missing one
    "Build twice under different RNG states; the two builds must agree bitwise."
    a = build_in_fresh_home(monkeypatch, tmp_path/"a", _perturb_a, build, prepare)
    b = build_in_fresh_home(monkeypatch, tmp_path/"b", _perturb_b, build, prepare)
    assert len({k.split(":")[0] for k in a if ":" in k}) >= min_files
    d = differences(a, b)
    assert not d, f"{len(d)} of {len(a)} tensors differ between two builds of the same config, e.g. {d[:5]}"


# The check itself can fail: a builder that creates its module before seeding is caught.
def _toy_builder(seed_first:bool):
    def build():
        cfg = {"steps": 3, "seed": 0}
        early = None if seed_first else nn.Linear(4, 3)   # the bug: initial weights from whatever state the process has
        def make():
            seed_everything(cfg["seed"]); m = nn.Linear(4, 3) if seed_first else early
            opt = torch.optim.SGD(m.parameters(), 0.1); x = torch.randn(8, 4)
            for _ in range(cfg["steps"]): opt.zero_grad(); m(x).pow(2).mean().backward(); opt.step()
            return {k: v.detach().clone() for k, v in m.state_dict().items()}
        return cached_tensors("toy-builder", cfg, make)
    return build

def test_check_catches_an_unseeded_builder(monkeypatch, tmp_path):
    with pytest.raises(AssertionError, match="differ between two builds"):
        check_seeded(monkeypatch, tmp_path, _toy_builder(seed_first=False))

def test_check_passes_a_seeded_builder(monkeypatch, tmp_path):
    check_seeded(monkeypatch, tmp_path, _toy_builder(seed_first=True))


# DisBack
def test_disback_ring_teacher(monkeypatch, tmp_path):
    from distill_nb.disback import RING_TEACHER, ring_teacher
    check_seeded(monkeypatch, tmp_path, lambda: ring_teacher(dict(RING_TEACHER, steps=3, batch_size=32)))

def test_disback_digits_teacher(monkeypatch, tmp_path):
    from distill_nb.disback import DIGITS_TEACHER, digits_teacher
    check_seeded(monkeypatch, tmp_path, lambda: digits_teacher(dict(DIGITS_TEACHER, steps=3, batch_size=32)))

def test_disback_digits_classifier(monkeypatch, tmp_path):
    from distill_nb.disback import DIGITS_CLASSIFIER, digits_classifier
    check_seeded(monkeypatch, tmp_path, lambda: digits_classifier(dict(DIGITS_CLASSIFIER, steps=3)))


# Distiller: the MiniLM tweet teacher (its classifier head is new, hence random), its cached outputs, the augmented-copy
# logits, and the GLUE launcher's teacher fine-tuned from a pretrained body (again a random head).
def test_distiller_tweet_teacher_and_outputs(monkeypatch, tmp_path):
    from distill_nb.distiller import TweetTeacherConfig, teacher_outputs, augmented_teacher_logits
    cfg = TweetTeacherConfig(n_train=64, n_test=16, max_len=16, steps=2, batch_size=8)
    def build():
        out = teacher_outputs(8, cfg)
        _, _, aug = augmented_teacher_logits(4, cfg, n_aug=2)
        return {"outputs": out, "aug_logits": aug}
    check_seeded(monkeypatch, tmp_path, build, min_files=3)   # minilm-tweets, tweets-teacher, tweets-aug-logits

def test_distiller_glue_teacher(monkeypatch, tmp_path):
    from transformers import AutoTokenizer
    from distill_nb.data import minilm_path
    from distill_nb.distiller import encode
    from distill_nb.distiller_full import GlueDistillConfig, glue_teacher
    cfg = GlueDistillConfig(teacher=str(minilm_path()), tokenizer="minilm", teacher_finetune_steps=2, max_seq_length=16)
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    texts = ["a fine film", "dull and long", "i loved it", "never again", "great cast", "a waste of time"]
    ids, am = encode(tok, texts, 16); y = torch.tensor([1, 0, 1, 0, 1, 0])
    check_seeded(monkeypatch, tmp_path, lambda: glue_teacher(cfg, 2, tok.vocab_size, ids, am, y))


# DisWOT
def test_diswot_quick_teacher(monkeypatch, tmp_path):
    from distill_nb.diswot import QuickTeacherConfig, quick_teacher
    check_seeded(monkeypatch, tmp_path, lambda: quick_teacher(QuickTeacherConfig(epochs=1, n_train=256)))

def test_diswot_full_teacher(monkeypatch, tmp_path):
    from distill_nb.diswot_full import DiswotFullConfig, full_data, _full_teacher
    from distill_nb.launch import make_accelerator
    cfg = DiswotFullConfig(dataset="synthetic", n_synthetic=64, synthetic_size=8, synthetic_classes=4,
                           teacher_stages=[[1, 4, 3], [1, 8, 3]], teacher_epochs=1, teacher_batch_size=32, teacher_lr_decay_at=[0.5],
                           teacher_checkpoint_every=1000, mixed_precision="no")
    train, _, k = full_data(cfg); acc = make_accelerator("no"); n = iter(range(2))
    check_seeded(monkeypatch, tmp_path, lambda: _full_teacher(cfg, train, k, acc, tmp_path/f"run{next(n)}", None))


# Hyper-SD
def test_hyper_sd_ring_teacher(monkeypatch, tmp_path):
    from distill_nb.hyper_sd import ring_teacher
    check_seeded(monkeypatch, tmp_path, lambda: ring_teacher(seed=0, steps=3))

def test_hyper_sd_digits_teacher(monkeypatch, tmp_path):
    from distill_nb.hyper_sd import DigitsTeacherConfig, digits_teacher
    check_seeded(monkeypatch, tmp_path, lambda: digits_teacher(DigitsTeacherConfig(steps=3, batch_size=32)))

def test_hyper_sd_loras(monkeypatch, tmp_path):
    # the teacher is cached before the RNG is perturbed, as when it comes from a fixture: its build (which seeds) cannot hide
    # a LoRA whose random down-projections are drawn before the seed
    from distill_nb.hyper_sd import DigitsTeacherConfig, DigitsDistillConfig, cached_student, digits_teacher
    t_cfg, s_cfg = DigitsTeacherConfig(steps=3, batch_size=32), DigitsDistillConfig(iters=4, batch_size=16)
    check_seeded(monkeypatch, tmp_path, lambda: [cached_student(m, s_cfg, t_cfg) for m in ("tscd", "cd")], min_files=3,
                 prepare=lambda: digits_teacher(t_cfg))

def test_hyper_sd_classifiers_and_segmenter(monkeypatch, tmp_path):
    from distill_nb.hyper_sd import digits_classifier, reward_classifier, digits_segmenter
    check_seeded(monkeypatch, tmp_path, lambda: [digits_classifier(steps=3), reward_classifier(steps=3), digits_segmenter(steps=3)],
                 min_files=3)


# Distill from similar sources
def test_similar_source(monkeypatch, tmp_path):
    from distill_nb.similar import SourceConfig, train_source
    check_seeded(monkeypatch, tmp_path, lambda: train_source(SourceConfig(domain="fashion", n_train=256, steps=2, batch_size=32)))

def test_similar_mnist_means(monkeypatch, tmp_path):
    from distill_nb.similar import mnist_source
    check_seeded(monkeypatch, tmp_path, mnist_source)

def test_similar_strong_init(monkeypatch, tmp_path):
    from distill_nb.similar import InitConfig, strong_init
    check_seeded(monkeypatch, tmp_path, lambda: strong_init(InitConfig(target="fashion", n_per_domain=64, steps=2, batch_size=32)))

def test_similar_full_source(monkeypatch, tmp_path):
    from distill_nb.similar_full import SourceSpec, build_source, make_toy_image_folder
    root = make_toy_image_folder(tmp_path/"data", classes=3, n_train=8, n_test=2, size=16, name="src")
    spec = SourceSpec(name="toy", arch="small_cnn", num_classes=3, train_dir=str(root/"train"), train_steps=2)
    check_seeded(monkeypatch, tmp_path, lambda: build_source(spec, 16))


# Hinton (the lead's notebook): the digits teacher and the launcher's teacher
def test_hinton_digits_teacher(monkeypatch, tmp_path):
    from distill_nb.hinton import TeacherConfig, digits_teacher
    check_seeded(monkeypatch, tmp_path, lambda: digits_teacher(TeacherConfig(sizes=[64, 32, 10], steps=3)))

def test_hinton_full_teacher(monkeypatch, tmp_path):
    from distill_nb.hinton_full import HintonFullConfig, hinton_full
    cfg = HintonFullConfig(dataset="synthetic", n_synthetic=64, teacher=[16, 32, 4], teacher_steps=3, student=[16, 8, 4], steps=2,
                           batch_size=16, checkpoint_every=1000)
    n = iter(range(2))
    def build():
        hinton_full(cfg, tmp_path/f"run{next(n)}"); return {}
    check_seeded(monkeypatch, tmp_path, build)
