# Doge-320M (docs/reference.md, Published shapes and recipes): 32k steps of 2M tokens at T=2048
# (64B tokens), lr 2e-3, WSD with 3200 warmup steps and a 10% linear decay to 0, otherwise as
# config/doge_20m.py.
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_320m.py

out_dir = "out/doge-320m"
data_dir = "data/smollm"
model = "doge-320m"

batch_size = 4
block_size = 2048
total_batch_size = 2097152  # 1024 sequences of 2048 tokens

max_iters = 32000
learning_rate = 2e-3
warmup_iters = 3200
decay_iters = 3200
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
