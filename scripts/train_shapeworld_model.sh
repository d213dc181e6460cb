#!/usr/bin/env bash
# Reproduces the model shipped in harmon/assets/shapeworld from nothing, on a CPU (2 cores: about
# 17 hours). Every input is generated (ShapeWorld; the seeds are fixed here and in the configs);
# everything is written under runs/. Each step resumes where it stopped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. the VAE (stride 8, 64 px): 6000 steps on 32 px crops, then 3000 on whole images, one
#    cosine schedule of 9000 steps
harmon train-vae --out runs/shapeworld_vae --steps 9000 --batch-size 16 --crop 32 --lr 1e-3 \
    --warmup 100 --stop-at 6000 --resume
harmon train-vae --out runs/shapeworld_vae --steps 9000 --batch-size 16 --crop 0 --lr 1e-3 \
    --warmup 100 --resume
# 2. the tokenizer: byte-level BPE, 512 ids, on ShapeWorld texts
harmon train-tokenizer --out runs/shapeworld_tokenizer --vocab-size 512 --scenes 4000 --seed 0
# 3. Harmon: stage 0 (the LLM learns the language), stages I-III, then stage IV (sin-cos position
#    tables and a lower mask ratio, so the generator learns layout), then stage V (local
#    convolutions added to the MAR, so the shared encoder sees shapes), then stage VI (3500 more steps
#    of stage V's recipe in three parts), then stage VII (2000 more, colour questions drawn twice as
#    often), then stage VIII (1400 more, colour questions a little more often again), then stage IX
#    (1200 more, half again as many text-to-image samples per step), then stages X-F to X-F4
#    (the generator alone, 4 x 700 steps, the loss of objects' tokens counted four times), then
#    stages X-C and X-C2 (2 x 700 more, the generator reading its visible tokens with noise), then
#    stages X-T and X-U (600 + 900 more, the LLM training again with the generator on pairs
#    named in reading order, half the batches with every token masked), then stages X-V, X-W and
#    X-W2 (3 x 900 more of X-U's recipe, X-W2 with the questions reworded half of the time), then
#    stages X-W3 and X-W4 (2 x 900 more of X-W2's recipe: the relation words begin to be read),
#    then stages X-A1 and X-A2 (2 x 900 more with vertical pairs captioned by their relation only,
#    and_horizontal), then stages X-A3 and X-A4 (2 x 900 more of X-A2's recipe, counting scenes a
#    little more often); configs/shapeworld_model_*.toml
for s in 0 1 2 3 4 5_conv 6_conv 7_conv 8_conv 9_conv 10_conv 11_conv 17_fg 18_fg 19_fg 20_fg 21_ctx 22_ctx \
         27_order 28_order 29_order 30_order 31_words 32_words 33_words 35_axis 36_axis \
         37_axis 38_axis; do
  harmon train configs/shapeworld_model_stage$s.toml --resume
done
# 4. the VAE decoder again, alone, on latents with noise (a per-token std drawn from [0, 1] of the
#    latents' unit): the encoder, so the latent space and every answer, stays; the decoder learns to
#    make clean shapes of the slightly wrong latents the generator draws (stage X-D). No harmon
#    train run trains the VAE, so stage X-F4's VAE is stage X-A4's
harmon train-vae --decoder-only --init runs/shapeworld_model_stage20_fg/final --latent-noise 1.0 \
    --out runs/shapeworld_vae_decoder --steps 1500 --batch-size 32 --crop 0 --lr 2e-4 --warmup 50 \
    --seed 41 --data-seed 41 --resume
# 5. stage X-A4 as it was released (float16 weights with the decoder of step 4, head temperature
#    0.7: benchmarks/guidance_sweep.py, docs/model_card.md): stages X-B and X-B2 start from it
python -m harmon.train.ship runs/shapeworld_model_stage38_axis/final \
    runs/shapeworld_model_stage38_shipped --decoder runs/shapeworld_vae_decoder --temperature 0.7
# 6. stages X-B and X-B2 (2 x 900 more of X-A4's recipe, captions without colours more often)
for s in 39_plain 40_plain; do
  harmon train configs/shapeworld_model_stage$s.toml --resume
done
# 7. ship: float16 weights + tokenizer + config into the package (the decoder is step 4's, read
#    from the init of step 6), with the head temperature it draws best with, and each image the
#    best of two draws by the model's own reading (benchmarks/self_rerank.py, docs/model_card.md)
python -m harmon.train.ship runs/shapeworld_model_stage40_plain/final harmon/assets/shapeworld \
    --temperature 0.7 --candidates 2
# 8. score it (the numbers of docs/model_card.md)
harmon eval model --samples 1 --vqa-images 500 --out runs/eval_shipped
