"""Ready-made distillation settings, one YAML per model (`caprese-distill run --preset NAME`).

A preset's default run directory is CAPRESE_CACHE_DIR/runs/NAME (~/.cache/caprese/runs/NAME):
`make serve` serves its adapter and the end-to-end tests use it, so it is distilled once per machine.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__package__).iterdir()
                  if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    path = resources.files(__package__) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no distillation preset {name!r}; presets: {', '.join(preset_names())}")
    return Path(str(path))


def default_run_dir(name: str) -> Path:
    from caprese_vllm.zoo.fetch import default_cache_dir

    return default_cache_dir().parent / "runs" / name
