"""Compression: score every layer's importance (importance, dependency, tracing, hidden), choose the
layers to keep (select), build the shorter model with bridges where kept layers were not neighbours
(compact, bridges), and heal it by distillation (distill). compress is the driver that does all of it.
"""
