# Doge-60M (docs/reference.md, Published shapes and recipes): 16k steps of 1M tokens at T=2048 (16B
# tokens), lr 6e-3, WSD with 10% warmup and a 10% linear decay to 0, otherwise as
# config/doge_20m.py.
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_60m.py

out_dir = "out/doge-60m"
data_dir = "data/smollm"
model = "doge-60m"

batch_size = 8  # sequences a micro-step: 64 micro-steps a step on one GPU
total_batch_size = 512 * 2048  # 512 sequences of 2048 tokens a step
max_iters = 16000
learning_rate = 6e-3
warmup_iters = decay_iters = max_iters // 10

eval_interval = 500
dtype = "bfloat16"
compile = True
