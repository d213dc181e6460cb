#!/usr/bin/env bash
# Reproduces the model shipped in harmon/assets/shapeworld from nothing, on CPU.
# Every input is generated (ShapeWorld, seeds fixed in the configs); outputs go to runs/.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. the VAE (stride 8, 64 px): 2500 steps on 32 px crops, then to step 3750 of a 5000-step
#    schedule on 48 px crops (the run shipped in v0.1 was stopped there for time)
harmon train-vae --out runs/shapeworld_vae --steps 2500 --batch-size 16 --crop 32 --lr 1e-3 --warmup 50
harmon train-vae --out runs/shapeworld_vae --steps 5000 --batch-size 12 --crop 48 --lr 5e-4 --warmup 50 \
    --resume --stop-at 3750
# 2. the tokenizer: byte-level BPE, 512 ids, on ShapeWorld texts
harmon train-tokenizer --out runs/shapeworld_tokenizer --vocab-size 512 --scenes 4000 --seed 0
# 3. Harmon, stages I-III (configs/shapeworld_model_stage*.toml)
for s in 1 2 3; do
  harmon train configs/shapeworld_model_stage$s.toml --resume
done
# 4. ship: float16 weights + tokenizer + config into the package
python -m harmon.train.ship runs/shapeworld_model_stage3/final harmon/assets/shapeworld
