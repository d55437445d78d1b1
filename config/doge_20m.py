# Doge-20M, the published recipe (docs/reference.md, Published shapes and recipes): 8k steps of
# 0.5M tokens at T=2048 (4.2B tokens), AdamW (0.9, 0.95) eps 1e-8 wd 0.01, clip 1.0, WSD with 800
# warmup and 800 decay steps to 0, bf16, compiled. Sized for one 24 GB RTX 4090:
#     python train.py config/doge_20m.py
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_20m.py
# Data: a pretraining corpus in the Doge tokenizer's 32768 tokens, e.g.
#     python prepare_data.py --source=HuggingFaceTB/smollm-corpus:cosmopedia-v2 \
#         --tokenizer=path/to/Doge-20M --out_dir=data/smollm --max_tokens=4.3e9

out_dir = "out/doge-20m"
data_dir = "data/smollm"
model = "doge-20m"

batch_size = 16  # x 2048 tokens per micro-step: 16 micro-steps per step on one GPU
block_size = 2048
total_batch_size = 524288  # 256 sequences of 2048 tokens

max_iters = 8000
learning_rate = 8e-3
warmup_iters = 800
decay_iters = 800
min_lr_ratio = 0.0
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0

eval_interval = 250
eval_iters = 20
log_interval = 10
save_interval = 1000  # stable-phase checkpoints: any of them can branch its own decay
dtype = "bfloat16"
compile = True
