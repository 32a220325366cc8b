"""The smallest whole spec the end-to-end tests run: {name}, {corpus} and {teacher} are filled in
(TOML lines of the [corpus] and [teacher] tables)."""

MICRO_SPEC = """
name = "{name}"
[corpus]
{corpus}
[backbone]
hidden_dim = 16
num_layers = 2
num_query_heads = 2
num_kv_heads = 1
head_dim = 8
ffn_dim = 32
max_seq_len = 64
pretrain = {{ steps = 2, batch = 2, seq_len = 32 }}
[teacher]
{teacher}
[oracle]
rows = 64
engram_dim = 8
seq_len = 32
pca_sample_min = 16
cos_sample = 16
[model]
inject_layers = [1]
top_k = 4
num_heads = 2
[train]
steps = 2
batch = 2
seq_len = 32
warmup = 1
eval_every = 2
eval_batches = 1
aux_warmup = 1
precision = "fp32"
[probes]
batches = 1
batch = 1
seq_len = 32
[[cells]]
name = "router_off_real"
"""
