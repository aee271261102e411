"""Training: fitting a recommender to its data set (train) and the per-epoch checkpoints that let a
long run resume (resume).
"""
