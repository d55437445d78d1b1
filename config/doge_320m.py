# Doge-320M (docs/reference.md, Published shapes and recipes): 32k steps of 2M tokens at T=2048
# (64B tokens), lr 2e-3, WSD with 3200 warmup steps and a 10% linear decay to 0, otherwise as
# config/doge_20m.py.
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_320m.py

out_dir = "out/doge-320m"
data_dir = "data/smollm"
model = "doge-320m"

batch_size = 4  # sequences a micro-step: 256 micro-steps a step on one GPU
total_batch_size = 1024 * 2048  # 1024 sequences of 2048 tokens a step
max_iters = 32000
learning_rate = 2e-3
warmup_iters = decay_iters = max_iters // 10

eval_interval = 1000
save_interval = 2000
dtype = "bfloat16"
compile = True
