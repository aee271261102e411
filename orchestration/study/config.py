"""The study's configuration: `layerwise study [CONFIG.yaml] [key=value ...]`.

    config = load_study_config("study.yaml", ["seeds=[0,1]", "sweep.heal_epochs=2"])

The data, teacher, compression, tracking and benchmark sections are the pipeline's own (orchestration.pipeline.config),
so a study and `layerwise run` describe a model the same way. What a study adds: the seeds, the baselines,
the ablation components, the k sweep, the noise levels and the scenario slices. Unknown keys and wrong types
are errors that name the key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layerwise.compression.distill import HealConfig
from layerwise.training.train import TrainConfig
from orchestration.baselines.method import ORDER, PRETRAINED_ONLY
from orchestration.pipeline.config import (
    BenchConfig, CompressStageConfig, DataConfig, TeacherConfig, TrackingConfig, load_config,
)

# Every compression baseline of layerwise.baselines, in the table order of `layerwise baselines`; a study of
# a pretrained LLM teacher lists `truncated` (its first k pretrained layers, no teacher) as well.
ALL_BASELINES = tuple(n for n in ORDER if n not in PRETRAINED_ONLY)
# One component changed at a time. "estimators": selection by `combined` over all local estimators, then
# without each one; "bridges" removes them (or adds rank-16 ones when compress.bridge_rank is 0, the
# default); "items" (LLM teachers whose items start from their titles): a teacher whose items start at
# random, trained and compressed the same way; the others switch one part of our method off.
ABLATIONS = ("estimators", "bridges", "kd", "hidden", "prefit", "heal", "items")
DEFAULT_ABLATIONS = tuple(a for a in ABLATIONS if a != "items")  # an LLM study lists "items" itself


@dataclass(frozen=True)
class SweepConfig:
    """k from 1 to L-1 (or `ks`) for each selector; "ours" is compress.selector."""

    selectors: tuple[str, ...] = ("ours", "random", "uniform")
    ks: tuple[int, ...] = ()  # empty: every k from 1 to L-1
    heal_epochs: int = 3  # a shorter heal than the headline's: 3 selectors x (L-1) models per seed


@dataclass(frozen=True)
class NoiseConfig:
    kinds: tuple[str, ...] = ("replace_uniform", "drop", "reorder")
    levels: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class ScenarioConfig:
    min_users: int = 20  # slices with fewer test users are dropped (and counted)
    n_flag: int = 10  # flag at most this many slices where the compact model loses most


# Both torch's own kernels (chosen by the CPU's features: AVX-512 here, AVX2 on older x86) and MKL's matrix
# products (its code path per CPU) change the bits a training run ends with: the same seed trained other
# Beauty teachers on two machines of this workplace. Pinned to one instruction set (with MKL's conditional
# numerical reproducibility), a seed's models come out the same on any machine that has it.
# `ray.portable_numerics: true` sets these in the seed tasks, for the instruction set `ray.portable_isa`:
# - avx2: any x86 machine of the last decade; 4-17% slower on a float32 training step here. bf16 has no
#   AVX2 kernels, so under this pin bf16 autocast is emulated: a SmolLM2 training step took 190 s against
#   6.9 s unpinned (benchmarks/results/portable_numerics.json), and the study config refuses the pair.
# - avx512_bf16: machines with AVX-512 and its bf16 instructions (this workplace's), bf16 at full speed.
PORTABLE_NUMERICS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


@dataclass(frozen=True)
class StudyRayConfig:
    address: str | None = None  # None: embedded local Ray (or $RAY_ADDRESS when set)
    cpus_per_seed: float = 1.0  # each seed is one Ray task; torch in it uses this many threads (at least 1)
    # Train with the same CPU kernels on every x86 machine with the instruction set `portable_isa`
    # (PORTABLE_NUMERICS above), so that a study archived on one machine resumes on
    # another. avx2: any recent x86, float32 only (bf16 is emulated there, ~27x slower); avx512_bf16:
    # AVX-512 machines with bf16, for recipes with bf16 autocast.
    portable_numerics: bool = False
    portable_isa: str = "avx2"


@dataclass(frozen=True)
class TargetConfig:
    """What the report judges the headline against, met only when the whole 95% CI clears it. retention: the
    fraction of the teacher's NDCG@10 to keep; speedup_of_bound: the fraction of the Amdahl bound at the
    study's k to reach (the bound comes from the measured time outside the layers, so no fixed multiple of
    the layer count is promised: 2 of 8 layers on Beauty's 12k-item head are bounded at 2.82x, not 4x)."""

    retention: float = 0.90
    speedup_of_bound: float = 0.90


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    run_dir: str = "runs"
    # Where every stage of every seed runs its models, and the driver its speed benchmark (layerwise.device):
    # auto (a GPU when one is visible), cpu, cuda, cuda:N. In no stage's key: a stage made on a GPU is the
    # same stage as on a CPU (its _seconds.json records the device), so a study resumes on either.
    device: str = "auto"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # seed = teacher init + data order + calibration draw
    data: DataConfig = field(default_factory=DataConfig)
    # No wall-clock cap on the teachers (early stopping ends them): a cap would give each seed a different
    # training budget depending on what else the machine runs.
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(train=TrainConfig()))
    # The library's 20 healing epochs: `make run` heals for 10 to fit its time budget; the study does not.
    compress: CompressStageConfig = field(default_factory=lambda: CompressStageConfig(heal=HealConfig()))
    baselines: tuple[str, ...] = ALL_BASELINES
    random_draws: int = 3  # random-layer draws per seed for the `random` baseline
    ablation: tuple[str, ...] = DEFAULT_ABLATIONS
    # The ablation and the k sweep run on the first `extras_seeds` seeds (None: on all). They are most of a
    # seed's cost (about 25 heals), so on a small machine they can get fewer seeds than the headline.
    extras_seeds: int | None = None
    # Validation users of the first seed's dependency matrix, the report's heatmap (None: the importance
    # stage's compress.ablation_users). It costs 1 + L + L(L-1)/2 evaluations of them: fewer users keep a
    # 30-layer LLM's to about an hour on 2 cores.
    dependency_users: int | None = None
    sweep: SweepConfig = field(default_factory=SweepConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    scenarios: ScenarioConfig = field(default_factory=ScenarioConfig)
    ray: StudyRayConfig = field(default_factory=StudyRayConfig)
    # Run folders of other studies (runs/<name>) whose finished stages this one uses where it needs the
    # same stage with the same key: a variant with another healing recipe reuses their teachers and
    # importance, and runs only what its change touches.
    reuse: tuple[str, ...] = ()
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="layerwise-study"))
    bench: BenchConfig = field(default_factory=BenchConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)  # the report's only; in no stage's key


def extras_seeds(config: StudyConfig) -> tuple[int, ...]:
    """The seeds that also run the ablation and the k sweep."""
    return tuple(config.seeds[:config.extras_seeds]) if config.extras_seeds else tuple(config.seeds)


def load_study_config(path: str | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """StudyConfig from the embedded defaults, a YAML file, then key=value overrides; checked."""
    config = load_config(path, overrides, cls=StudyConfig)
    check(config)
    return config


def load_study_data(config: StudyConfig):
    """The study's data set, as its config names it (a Parquet cache makes a second load fast)."""
    from layerwise.data import load_dataset

    d = config.data
    return load_dataset(d.dataset, data_dir=d.data_dir, cache_dir=d.cache_dir, min_core=d.min_core)


def check(config: StudyConfig) -> None:
    """Reject settings that would fail hours into a run, naming the key."""
    from layerwise.baselines import BASELINES
    from layerwise.device import check_device
    from layerwise.evaluation.noise import KINDS
    from layerwise.compression.select import SELECTORS

    check_device(config.device)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(config.seeds)}")
    unknown = sorted(set(config.baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"baselines: unknown {unknown}; choose from {sorted(BASELINES)}")
    needs = sorted(set(config.baselines) & set(PRETRAINED_ONLY))
    if needs and not config.teacher.pretrained:
        raise ValueError(f"baselines: {needs} start again from the teacher's pretrained LLM, and "
                         "teacher.pretrained is not set")
    unknown = sorted(set(config.ablation) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"ablation: unknown components {unknown}; choose from {list(ABLATIONS)}")
    llm = config.teacher.llm
    if "items" in config.ablation and not (config.teacher.pretrained and llm and llm.item_init != "random"):
        raise ValueError("ablation: 'items' compares a teacher whose items start from their titles with one "
                         "whose items start at random; it needs teacher.pretrained and teacher.llm.item_init "
                         "other than 'random'")
    unknown = sorted(set(config.sweep.selectors) - set(SELECTORS) - {"ours"})
    if unknown:
        raise ValueError(f"sweep.selectors: unknown {unknown}; choose from ['ours', *{sorted(SELECTORS)}]")
    if config.compress.selector not in SELECTORS:
        raise ValueError(f"compress.selector: unknown {config.compress.selector!r}; choose from {sorted(SELECTORS)}")
    unknown = sorted(set(config.noise.kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"noise.kinds: unknown {unknown}; choose from {list(KINDS)}")
    bad = [lv for lv in config.noise.levels if not 0.0 <= lv < 1.0]
    if bad:
        raise ValueError(f"noise.levels must be in [0, 1), got {bad}")
    if any(k < 1 for k in config.sweep.ks):
        raise ValueError(f"sweep.ks must be >= 1, got {list(config.sweep.ks)}")
    _check_numerics(config)
    if config.random_draws < 1 or config.sweep.heal_epochs < 1 or config.ray.cpus_per_seed <= 0:
        raise ValueError("random_draws and sweep.heal_epochs must be >= 1 and ray.cpus_per_seed > 0")
    if config.extras_seeds is not None and not 1 <= config.extras_seeds <= len(config.seeds):
        raise ValueError(f"extras_seeds must be between 1 and the {len(config.seeds)} seeds, "
                         f"got {config.extras_seeds}")
    for other in config.reuse:
        if not (Path(other) / "seeds").is_dir():
            raise ValueError(f"reuse: {other!r} is not a study's run folder (no seeds/ in it)")
        if Path(other).resolve() == (Path(config.run_dir) / config.name).resolve():
            raise ValueError(f"reuse: {other!r} is this study's own run folder")
    if config.dependency_users is not None and config.dependency_users < 1:
        raise ValueError(f"dependency_users must be >= 1 (or unset: compress.ablation_users), "
                         f"got {config.dependency_users}")
    if config.scenarios.min_users < 2:
        raise ValueError(f"scenarios.min_users must be >= 2, got {config.scenarios.min_users}")


def _check_numerics(config: StudyConfig) -> None:
    """ray.portable_isa must be a known one, and not AVX2 under a bf16 recipe (emulated there: ~27x slower)."""
    isa = config.ray.portable_isa
    if isa not in PORTABLE_NUMERICS:
        raise ValueError(f"ray.portable_isa: unknown {isa!r}; choose from {sorted(PORTABLE_NUMERICS)}")
    bf16 = [key for key, value in (("teacher.train.autocast", config.teacher.train.autocast),
                                   ("compress.heal.autocast", config.compress.heal.autocast)) if value == "bf16"]
    if config.ray.portable_numerics and isa == "avx2" and bf16:
        raise ValueError(f"{', '.join(bf16)}: bf16 under ray.portable_numerics with ray.portable_isa avx2 is "
                         f"emulated (a SmolLM2 training step took 190 s against 6.9 s unpinned); set "
                         f"ray.portable_isa: avx512_bf16, or train in float32")


def config_dict(config: StudyConfig) -> dict:
    """The config as plain data (tuples as lists) that `_build` turns back into the same StudyConfig."""
    return json.loads(json.dumps(asdict(config)))
