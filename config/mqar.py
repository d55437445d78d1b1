# Multi-query associative recall (MQAR): does the model find, for each key that comes back as a
# query, the value that followed it earlier in the sequence? A 2-layer Doge of about 91k
# parameters learns it on a CPU in a few minutes (docs/recall.md).
#     python recall.py --task=data --out_dir=data/mqar   # seconds: 100,000 + 1,024 sequences
#     python train.py config/mqar.py                      # plain attention (keep_window_size 40)
#     python recall.py --task=score --init_from=out/mqar
# Windowed models start from this one: config/mqar_window.py.
# The data are conversation shards: the loss is on the value after each query alone, one sequence
# a row, and val_acc (logged at each evaluation) is the share of those values the model gets right.

out_dir = "out/mqar"
data_dir = "data/mqar"
overwrite = True  # an experiment: running it again starts afresh

# the model: no preset; 2 heads with a key/value head (so a dynamic bias) each
model = None
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 2
max_position_embeddings = 64
keep_window_size = 40  # >= the sequence length: plain causal attention

# 64 sequences of 40 tokens per step (block_size is the sequence length: no padding)
batch_size = 64
block_size = 40
total_batch_size = 2560

# WSD
max_iters = 1500
learning_rate = 3e-3
warmup_iters = 50
decay_iters = 300

eval_interval = 100
eval_iters = 16  # 16 x 64 rows: the 1,024 validation sequences once
log_interval = 50
save_interval = 0  # the end only
