# Doge-160M (docs/reference.md, Published shapes and recipes): 24k steps of 1.5M tokens at T=2048
# (32B tokens), lr 4e-3, WSD with 10% warmup and a 10% linear decay to 0, otherwise as
# config/doge_20m.py.
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_160m.py

out_dir = "out/doge-160m"
data_dir = "data/smollm"
model = "doge-160m"

batch_size = 4  # sequences a micro-step: 192 micro-steps a step on one GPU
total_batch_size = 768 * 2048  # 768 sequences of 2048 tokens a step
max_iters = 24000
learning_rate = 4e-3
warmup_iters = decay_iters = max_iters // 10

eval_interval = 1000
save_interval = 2000
dtype = "bfloat16"
compile = True
