"""Distributed work on Ray: the one place that starts or joins Ray (`ray_runtime`), layer importance per
model shard as Ray tasks (`shards`), and teacher training and healing on Ray Train with DeepSpeed in every
worker (`training` drives, `train_loops` runs in the workers, `specs` says what they load,
`deepspeed_config` is the one DeepSpeed config)."""
