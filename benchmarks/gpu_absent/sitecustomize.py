"""Hide what a lent GPU machine lacks, for the GPU check's dry run here (benchmarks/gpu_check.sh puts this
folder first on PYTHONPATH, so every Python the check starts, pytest and the peak-memory subprocesses too,
imports this). Ray and MLflow do not fit in a call beside the tree, and Optuna and HQQ are not packed
(benchmarks/gpu_pack.py): a part of the check that imports one of them fails here as it would there.

The path finder is what hides them, so that `importlib.util.find_spec` says None as on a machine without
them (transformers and DeepSpeed ask it what is installed before they import anything)."""

import sys
from importlib.machinery import PathFinder

ABSENT = ("ray", "mlflow", "optuna", "hqq")


class _PathFinderWithout(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in ABSENT:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_PathFinderWithout if finder is PathFinder else finder for finder in sys.meta_path]
