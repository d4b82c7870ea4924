# imagenet-f16 tokenizer training throughput on 1 and 2 GPUs at the same global batch (64).
# Run on a 2-GPU machine from the repo root, with the lpips wheel importable: bash benchmarks/scaling/tok.sh
# ~72M parameters, 256 px, LPIPS on a random VGG trunk (same FLOPs, no download), GAN on from step 0 (the
# steady state after disc_start), 8 loader workers per GPU decoding 4096 random 256 px JPEGs.
set -e
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
STEPS=${STEPS:-50}; OUT=${OUT:-.}; RUNS=${RUNS:-/tmp/scale}
export PYTHONPATH=$PWD:$(python3 -c 'from benchmarks.common import make_lpips_importable as m; print(m() or "")')
python3 - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for c in range(8):
    folder = Path(f"/tmp/synth-images/c{c}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(512):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
PY
T="train-tokenizer --config configs/tokenizer/imagenet-f16.yaml --max-steps $STEPS --set data.dataset=/tmp/synth-images
   --set train.batch_size=64 --set loss.disc_start=0 --set loss.lpips_random_backbone=true
   --set train.log_every=10 --set train.sample_every=0 --set train.num_workers=8 ${EXTRA:-}"
CUDA_VISIBLE_DEVICES=0 python3 -m pipelines.cli $T --output $RUNS/tok-1
python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no -m pipelines.cli $T --output $RUNS/tok-2
python3 benchmarks/scaling/summary.py tok images_per_s 1 $RUNS/tok-1 $RUNS/tok-2
