# Doge-160M (docs/reference.md, Published shapes and recipes): 24k steps of 1.5M tokens at T=2048
# (32B tokens), lr 4e-3, WSD with 10% warmup and a 10% linear decay to 0, otherwise as
# config/doge_20m.py.
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_160m.py

out_dir = "out/doge-160m"
data_dir = "data/smollm"
model = "doge-160m"

batch_size = 4
block_size = 2048
total_batch_size = 1572864  # 768 sequences of 2048 tokens

max_iters = 24000
learning_rate = 4e-3
warmup_iters = 2400
decay_iters = 2400
min_lr_ratio = 0.0
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0

eval_interval = 1000
eval_iters = 20
log_interval = 10
save_interval = 2000
dtype = "bfloat16"
compile = True
