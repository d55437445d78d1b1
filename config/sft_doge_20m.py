# Doge-20M -> Doge-20M-Instruct, the supervised fine-tuning of the published recipe
# (docs/reference.md, Published shapes and recipes): smoltalk, 2 epochs, context 8192, lr 8e-5,
# bf16, one 24 GB RTX 4090.
#     hf download SmallDoge/Doge-20M --local-dir models/Doge-20M
#     pip install datasets                            # smoltalk comes from the hub
#     python prepare_data.py --chat --source=HuggingFaceTB/smoltalk:all \
#         --tokenizer=models/Doge-20M --out_dir=data/smoltalk  # chat tokenizer, conversation shards
#     python train.py config/sft_doge_20m.py
#     python sample.py --init_from=out/doge-20m-instruct/hf --chat
# Where we differ from the recipe, and why:
# - No packing. The recipe (TRL) packed conversations into rows of 8192 tokens, where they attend
#   to each other; here each conversation is a row of its own, right-padded (rows of a step are
#   sorted by length, so micro-batches hold little padding) and cut at 8192 tokens. A step is the
#   recipe's 128 rows, so 128 conversations: fewer tokens per step than its 1M, and more steps.
# - The schedule is WSD (warmup 10%, as the recipe's warmup_ratio, then constant, then a linear
#   decay to 0.1x over the last 20%), not the recipe's cosine_with_min_lr (min_lr_rate 0.1).
#   The step counts assume about 1M training conversations, about 16k steps for 2 epochs; the run
#   prints the exact number (sft_epochs sets max_iters).
# - The loss is the mean over every assistant token of a step, all micro-batches together.
# The Doge-20M tokenizer already holds the chat tokens; its own chat template is used if its
# tokenizer_config.json has one, else Doge's (<|start_header_id|>role<|end_header_id|>\n\n...).

out_dir = "out/doge-20m-instruct"
init_from = "models/Doge-20M"  # a Hugging Face Doge directory, or one of our out_dirs
data_dir = "data/smoltalk"  # conversation shards; validation: the data set's 'test' split
sft_epochs = 2

block_size = 8192
batch_size = 4  # x 8192 tokens at most per micro-step: 32 micro-steps per step on one GPU
total_batch_size = 1048576  # 128 rows of 8192

learning_rate = 8e-5
warmup_iters = 1600
decay_iters = 3200
min_lr_ratio = 0.1
beta2 = 0.999  # TRL's AdamW defaults, as the recipe ran

eval_interval = 500
dtype = "bfloat16"
compile = True
