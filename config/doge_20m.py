# Doge-20M, the published recipe (docs/reference.md, Published shapes and recipes): 8k steps of
# 0.5M tokens at T=2048 (4.2B tokens), AdamW (0.9, 0.95) eps 1e-8 wd 0.01, clip 1.0, WSD with 800
# warmup and 800 decay steps to 0, bf16, compiled. Sized for one 24 GB RTX 4090:
#     python train.py config/doge_20m.py
#     torchrun --standalone --nproc_per_node=8 train.py config/doge_20m.py
# Data: a pretraining corpus in the Doge tokenizer's 32768 tokens, e.g.
#     python prepare_data.py --source=HuggingFaceTB/smollm-corpus:cosmopedia-v2 \
#         --tokenizer=path/to/Doge-20M --out_dir=data/smollm --max_tokens=4.3e9

# train.py's defaults (TrainConfig) are this recipe: the doge-20m preset, micro-batches of 16 x 2048
# (16 micro-steps a step on one GPU), 524288 tokens a step, every checkpoint of the stable phase
# (every 1000 steps) able to branch a decay of its own. What is set here differs from them.

out_dir = "out/doge-20m"
data_dir = "data/smollm"
dtype = "bfloat16"
compile = True
