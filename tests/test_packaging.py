"""The installed package must carry every file its code reads at run time.

Found on an H200 (2026-12-01): with the package installed non-editable (`pip install --target`, as the
offline GPU kit does) `decode_latency.py --models llama-3.1-8b` failed ("invalid choice ... (choose
from )"): distill/speed.py read the target model shapes from the repository's benchmarks/configs, which
no wheel holds. Every data file now lives in a package folder listed in pyproject's package-data; this
test builds the wheel, installs it outside the repository and reads each kind of data file from there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What the installed code reads: run from outside the repo, with only the installed copy importable.
READ_DATA = """
import distill, caprese_vllm
from pathlib import Path
installed = {{Path(m.__file__).resolve().parent.parent for m in (distill, caprese_vllm)}}
assert installed == {{Path({target!r}).resolve()}}, installed
from distill.presets import preset_names, preset_path
from distill.speed import load_bench_shape, target_shape_names
assert set(target_shape_names()) >= {{"llama-3.1-8b", "gemma-2-9b"}}, target_shape_names()
for name in target_shape_names():
    load_bench_shape(name)
assert "gsm8k-paper" in preset_names(), preset_names()
for name in preset_names():
    preset_path(name).read_text()
print("ok", target_shape_names(), preset_names())
"""


def _source_copy(dest: Path) -> Path:
    """The files a clean checkout has (tracked + untracked, not ignored): a build inside the repository
    would reuse its ignored build/ folder, which can hold files the package-data rules no longer list."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_wheel_holds_the_data_files_the_code_reads(tmp_path):
    source = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("caprese_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data_dir in ("distill/presets/", "distill/target_shapes/"):
        in_repo = sorted(p.name for p in (REPO / data_dir).iterdir() if p.suffix in (".yaml", ".json"))
        in_wheel = sorted(Path(n).name for n in names if n.startswith(data_dir) and not n.endswith(".py"))
        assert in_wheel == in_repo, f"{data_dir}: wheel has {in_wheel}, repository {in_repo}"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, cwd=tmp_path)
    out = subprocess.run([sys.executable, "-c", READ_DATA.format(target=str(target))], cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok"), out.stdout
