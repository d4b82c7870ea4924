# Masked-L training throughput on 1 and 2 GPUs at the same global batch (256), DDP and FSDP.
# Run on a 2-GPU machine from the repo root: bash benchmarks/scaling/gen.sh   (STEPS=50 by default)
# configs/generator/masked-L.yaml: 338M parameters, 16x16 = 256 tokens, 16384 codes, bf16, torch.compile,
# EMA on (off under FSDP, which refuses it); a synthetic sharded token cache of 16 shards.
set -e
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
STEPS=${STEPS:-50}; OUT=${OUT:-.}; RUNS=${RUNS:-/tmp/scale}
python3 -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__, torch.cuda.device_count(), "GPUs")'
# 131072 items in 16 shards of 8192: 8 shards per GPU on 2 GPUs (shard order)
python3 -c 'from benchmarks.gen_train import write_synthetic_tokens
from generator.config import GeneratorConfig
config = GeneratorConfig(kind="masked", codebook_size=16384, grid_size=16, num_classes=1000)
write_synthetic_tokens(config, 131072, "/tmp/synth-tokens", shard_size=8192, batch_size=8192)'
G="train-generator --config configs/generator/masked-L.yaml --tokens /tmp/synth-tokens --max-steps $STEPS
   --set train.log_every=10 --set train.warmup_steps=10 --set train.sample_every=0 ${EXTRA:-}"
L="python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16
   --dynamo_backend no -m pipelines.cli"
CUDA_VISIBLE_DEVICES=0 python3 -m pipelines.cli $G --output $RUNS/gen-1
$L $G --output $RUNS/gen-2
python3 benchmarks/scaling/summary.py gen tokens_per_s 256 $RUNS/gen-1 $RUNS/gen-2
$L $G --set train.distributed=fsdp --set train.ema_decay=0 --output $RUNS/gen-2-fsdp \
    && python3 benchmarks/scaling/summary.py gen-fsdp tokens_per_s 256 $RUNS/gen-1 $RUNS/gen-2-fsdp \
    || echo "FSDP run failed"
