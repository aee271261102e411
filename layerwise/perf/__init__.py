"""Performance: interleaved latency and throughput benchmarks with the Amdahl bound (bench), the
disturbed-timing guard (guard), peak memory (memory) and the FLOP and byte model (cost).
"""
