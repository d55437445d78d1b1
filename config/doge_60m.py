# Doge-60M (docs/reference.md, Published shapes and recipes): 16k steps of 1M tokens at T=2048 (16B
# tokens), lr 6e-3, WSD with 10% warmup and a 10% linear decay to 0, otherwise as
# config/doge_20m.py.
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_60m.py

out_dir = "out/doge-60m"
data_dir = "data/smollm"
model = "doge-60m"

batch_size = 8
block_size = 2048
total_batch_size = 1048576  # 512 sequences of 2048 tokens

max_iters = 16000
learning_rate = 6e-3
warmup_iters = 1600
decay_iters = 1600
min_lr_ratio = 0.0
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0

eval_interval = 500
eval_iters = 20
log_interval = 10
save_interval = 1000
dtype = "bfloat16"
compile = True
