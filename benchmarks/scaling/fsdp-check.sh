# FSDP on 2 GPUs, short: masked-L trains 40 steps under FSDP (full shard, bf16, compile), writes its
# checkpoint once, and the model dir loads with load_generator. bash benchmarks/scaling/fsdp-check.sh
set -e
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
OUT=${OUT:-.}; RUNS=${RUNS:-/tmp/scale}
python3 -c 'from benchmarks.gen_train import write_synthetic_tokens
from generator.config import GeneratorConfig
config = GeneratorConfig(kind="masked", codebook_size=16384, grid_size=16, num_classes=1000)
write_synthetic_tokens(config, 32768, "/tmp/synth-tokens-small", shard_size=4096, batch_size=4096)'
python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no -m pipelines.cli train-generator --config configs/generator/masked-L.yaml \
    --tokens /tmp/synth-tokens-small --max-steps 40 --set train.log_every=10 --set train.warmup_steps=10 \
    --set train.sample_every=0 --set train.distributed=fsdp --set train.ema_decay=0 --output $RUNS/gen-2-fsdp
python3 -c "
from generator.base import load_generator
m = load_generator('$RUNS/gen-2-fsdp')
print('loaded', type(m).__name__, round(sum(p.numel() for p in m.parameters()) / 1e6, 1), 'M params')"
cp $RUNS/gen-2-fsdp/metrics.jsonl $OUT/gen-2-fsdp-metrics.jsonl
tail -1 $RUNS/gen-2-fsdp/metrics.jsonl
