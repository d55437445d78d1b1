# The tiny demo's model (config/doge_tiny.py) made a chat model on CPU in a few minutes:
# supervised fine-tuning on config/sft_doge_tiny.jsonl, 64 short conversations asking what 32
# of Python's builtin functions do, answered with the first sentence of their docstrings (two
# phrasings of each question, some with a system message, some two rounds long).
#     python train.py config/doge_tiny.py        # first: the base model in out/doge-tiny
#     python prepare_data.py --chat --input=config/sft_doge_tiny.jsonl --tokenizer=out/doge-tiny \
#         --out_dir=data/sft-tiny                # the chat tokenizer and conversation shards
#     python train.py config/sft_doge_tiny.py
#     python sample.py --init_from=out/doge-tiny-sft/hf --chat --start="What is len() for?"
# prepare_data.py adds the chat tokens to the SentencePiece vocabulary (a tokenizer.json), the
# run grows the model's embedding to fit and writes out/doge-tiny-sft/hf, a Hugging Face
# directory (transformers.AutoModelForCausalLM / AutoTokenizer load it too).

out_dir = "out/doge-tiny-sft"
init_from = "out/doge-tiny"  # the newest checkpoint of the pretraining demo, with its tokenizer
data_dir = "data/sft-tiny"  # prepare_data.py --chat held 1 in 20 conversations out for validation
overwrite = True  # a demo: running it again starts afresh

# one conversation per row, at most 256 tokens (the base model's length); 16 rows per step
block_size = 256
batch_size = 8
total_batch_size = 4096  # 2 micro-steps of 8 rows
sft_epochs = 40  # about 150 steps

# WSD: short warmup, a quarter of the run decaying
learning_rate = 6e-3
warmup_iters = 10
decay_iters = 40

eval_interval = 25
eval_iters = 1  # 8 rows: the 3 held-out conversations, again and again
log_interval = 5
save_interval = 0  # the end only
