#!/usr/bin/env bash
# Reproduces docs/results.md: pretrain ViT-tiny + MAE on the demo stores (2D and 3D), then linear probe,
# kNN, a short fine-tune and BraTS frozen segmentation, each next to a random-init baseline.
# CPU budget: ~20 min on a shared 2-core machine (one torch thread is fastest there).
#   bash scripts/run_results.sh            # writes outputs/results-*/ and outputs/eval/results/
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=outputs/eval/results
PRE="trainer.max_steps=300 trainer.log_every_n_steps=10 trainer.checkpoint_every_n_steps=100
     trainer.progress_bar=false trainer.preview_every_n_steps=0 data.num_workers=0"

# 1. pretraining (resume=auto: a finished run is reused)
ssl_med pretrain data=demo data.batch_size=16 experiment=results-vit-mae-demo2d $PRE
ssl_med pretrain data=demo3d data.batch_size=4 experiment=results-vit-mae-demo3d $PRE

EV="num_threads=1 baseline=true"
# 2. classification: linear probe (+ label efficiency) and kNN
for E in linear_probe knn; do
  ssl_med evaluate eval=$E checkpoint=outputs/results-vit-mae-demo2d eval_data=breastmnist $EV hydra.run.dir=$OUT/$E-breastmnist
  ssl_med evaluate eval=$E checkpoint=outputs/results-vit-mae-demo3d eval_data=vesselmnist3d $EV hydra.run.dir=$OUT/$E-vesselmnist3d
done

# 3. BraTS tumour segmentation, frozen encoder + UNETR decoder (3D, 2 mm, 32^3 crops)
ssl_med evaluate eval=segmentation eval.mode=frozen eval.steps=100 eval.eval_every=25 \
  checkpoint=outputs/results-vit-mae-demo3d eval_data=brats $EV hydra.run.dir=$OUT/segmentation-brats

# 4. short end-to-end fine-tune (same budget for both encoders)
ssl_med evaluate eval=finetune eval.steps=100 eval.eval_every=25 checkpoint=outputs/results-vit-mae-demo2d \
  eval_data=breastmnist $EV hydra.run.dir=$OUT/finetune-breastmnist
# VesselMNIST3D fine-tune: left out of docs/results.md (CPU budget); to run it:
#   ssl_med evaluate eval=finetune eval.steps=100 eval.eval_every=25 eval.batch_size=16 \
#     checkpoint=outputs/results-vit-mae-demo3d eval_data=vesselmnist3d $EV hydra.run.dir=$OUT/finetune-vesselmnist3d

# 5. one summary table over everything
ssl_med report $OUT

# 6. BraTS fine-tune (encoder too, layer-wise LR decay) + weight-interpolation curve
#    (alpha = 0 pretrained ... 1 fine-tuned encoder; test Dice and a VesselMNIST3D probe at each alpha).
#    Pretrained encoder only (baseline=false) to fit the CPU budget.
ssl_med evaluate eval=segmentation eval.mode=finetune eval.steps=100 eval.eval_every=25 \
  eval.interpolation.probe_data=vesselmnist3d checkpoint=outputs/results-vit-mae-demo3d eval_data=brats \
  num_threads=1 baseline=false hydra.run.dir=$OUT/segmentation-finetune-brats
