"""Fine-tune the source models a DistillNearest / DistillWeighted launcher config needs (e.g. configs/similar/resnet_pool.yaml).

For every source with `weights` (the file to write), `train_dir` (its labeled images, <train_dir>/<class>/*) and
`pretrained` (a local state dict to start from), the body starts from `pretrained`, a new classifier is fitted to the
source's own classes, and the result is written to `weights`, exactly where `distill_nb.launch similar` reads it.
Nothing is downloaded. The logic lives in `distill_nb.similar_full` (nbs/31_distill_similar_full.ipynb, "Fine-tuning the source pool").

    python scripts/finetune_sources.py --config configs/similar/resnet_pool.yaml [--only flowers_r18] [--force] [--set steps=500]
"""
from distill_nb.similar_full import finetune_cli

if __name__ == "__main__": finetune_cli()
