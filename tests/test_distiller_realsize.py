"""Distiller's GLUE launcher at the real architectures' sizes, on CPU (`make slow`): a random BERT-base teacher
(12 x 768, 12 heads, 110 M) and a random TinyBERT-4L-312D student under 2 processes, with the MNLI config's pipeline
(MI-alpha 0.9, transformer critic over examples, skip mapping, bf16, DataLoader workers) on a synthetic GLUE-format
MNLI (pairs with token types, matched and mismatched dev sets), sequence length 128. The teacher is fine-tuned as its
own distributed phase first. What it proves: shapes, the critic at full widths, token types and both dev sets at
real size; the numbers it learns on 64 synthetic examples mean nothing."""
import json, math, time
from pathlib import Path
import pytest
from safetensors.torch import load_file
from distill_nb.launch import run_launch, launch_report
from distill_nb.distiller_full import write_synthetic_glue

ROOT = Path(__file__).resolve().parents[1]

@pytest.mark.slow
def test_mnli_real_architectures_two_processes(tmp_path):
    data = write_synthetic_glue(tmp_path/"data", "MNLI", n_train=64, n_dev=16)
    sets = [f"data_root={data}", "teacher=random:bert-base", "student=random:tinybert-4l-312", "tokenizer=minilm",
            "teacher_finetune_steps=2", "teacher_batch_size=4", "teacher_dev_check=false", "batch_size=4", "eval_batch_size=8",
            "steps=3", "checkpoint_every=2", "num_workers=1"]
    t0 = time.time()
    r = run_launch("distiller", ROOT/"configs"/"distiller"/"glue_mnli.yaml", tmp_path/"run", 2, sets, home=tmp_path/"home")
    assert r.returncode == 0, launch_report(r)
    s = json.loads((tmp_path/"run"/"summary.json").read_text()); print(f"2 processes, 2 + 3 steps at real size: {time.time() - t0:.0f} s")
    assert s["world_size"] == 2 and s["mixed_precision"] == "bf16" and math.isfinite(s["final_loss"])
    assert {"mnli-m", "mnli-mm"} <= set(s["teacher_dev"]) and {"mnli-m", "mnli-mm"} <= set(s["student_dev_last"]), s["student_dev_last"]
    cfg = json.loads((tmp_path/"run"/"student_config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (312, 4, 12, 1200)
    st = load_file(tmp_path/"run"/"student.safetensors")
    n = sum(v.numel() for v in st.values()); assert 14e6 < n < 15e6, n              # TinyBERT-4L-312D: 14.5 M with its head
    ck = load_file(sorted((tmp_path/"run"/"checkpoints").glob("checkpoint-*/model.safetensors"))[-1])
    assert any(".crit." in k or k.startswith("model/crit.") for k in ck), sorted(ck)[:5]   # the critic trained beside the student
