# Doge-40M-MoE (docs/reference.md, Published shapes and recipes): the Doge-20M shape with a wider
# shared expert (768) and a Cross-Domain MoE of 1024 tiny experts, 8 per token; 32k steps, lr 8e-3,
# WSD with 10% warmup and a 10% linear decay to 0, otherwise as config/doge_20m.py.
#     python train.py config/doge_40m_moe.py
# The published model has the 128256-token Doge2 vocabulary; here the vocabulary follows the
# data (data_dir/meta.json), as for every scratch run: give --vocab_size=... to pin it.
#
# Upcycling instead of training from scratch: start from a dense checkpoint of the same shape
# (intermediate_size 768), its MLPs become the shared experts and the function is unchanged:
#     python train.py config/doge_40m_moe.py --init_from=out/doge-dense/ckpt_008000.pt \
#         --upcycle_experts=1024 --upcycle_experts_per_tok=8 --out_dir=out/doge-40m-moe-upcycled

out_dir = "out/doge-40m-moe"
data_dir = "data/smollm"
model = "doge-40m-moe"

batch_size = 16
block_size = 2048
total_batch_size = 524288  # 256 sequences of 2048 tokens

max_iters = 32000
learning_rate = 8e-3
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
