"""Past one machine: the plan of a 1B-13B run (parameters, memory per GPU under ZeRO 0-3, importance shards,
the DeepSpeed config; `plan`) and the offline check of the Ray cluster launcher config (`cluster_config`)."""
