# A small Doge trained on the default corpus (the Python standard library's own source, prepared
# by prepare_data.py into data/default on first use) in a few minutes on a laptop CPU; then
# sample.py shows what it writes.
#     python train.py config/doge_tiny.py && python sample.py
# The vocabulary comes from data/default/meta.json (the corpus' tokenizer).

out_dir = "out/doge-tiny"
overwrite = True  # a demo: running it again starts afresh (the recipes refuse to)

# the model: no preset, this shape (about 1.1M parameters besides the embedding)
model = None
hidden_size = 128
intermediate_size = 384
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 256
# Each query keeps at most 64 of the keys it sees (of up to 256 in a block): the dynamic mask
# drops keys in training, and a chat's state stops growing at 64 keys a layer. It costs about
# 0.04 in validation loss against a window that keeps every key (4.86 against 4.82 at step 300).
keep_window_size = 64

# 8 sequences of 256 tokens per step, no gradient accumulation
batch_size = 8
block_size = 256
total_batch_size = 2048

# WSD: 10% warmup, 20% decay
max_iters = 300
learning_rate = 5e-3
warmup_iters = 30
decay_iters = 60

eval_interval = 100
eval_iters = 10
save_interval = 100
