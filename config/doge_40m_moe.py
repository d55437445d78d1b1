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
model = "doge-40m-moe"  # the batch is Doge-20M's: 256 sequences of 2048 tokens a step
max_iters = 32000
warmup_iters = decay_iters = max_iters // 10
eval_interval = 1000
save_interval = 2000
dtype = "bfloat16"
compile = True
