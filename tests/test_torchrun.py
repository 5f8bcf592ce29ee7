"""torchrun scale-out: ranks write disjoint shares of the files; the result equals a one-process merge."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streammerge.testing.presets import check_merge, make_checkpoint

pytestmark = pytest.mark.slow  # real multi-process or multi-GB runs
ROOT = Path(__file__).resolve().parents[1]

OPTS = ["--max-shard-size", "100KB", "--no-optimizer", "--no-progress", "--dtype", "bfloat16"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(ckpt: Path, out: Path, nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "streammerge", str(ckpt), str(out), *OPTS]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".streammerge" not in p.parts}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), preset="tiny", world_size=4, jobs=1)


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    r = subprocess.run([sys.executable, "-m", "streammerge", str(ckpt), str(out), *OPTS], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_torchrun_output_is_byte_identical_to_one_process(ckpt, single, tmp_path):
    out = tmp_path / "out"
    r = _torchrun(ckpt, out, nproc=3)
    expected = _files(single)
    assert len([f for f in expected if f.endswith(".safetensors")]) >= 3  # enough files to share out
    assert _files(out) == expected
    # every rank wrote something: three "wrote ..." summaries, none of them empty
    files_per_rank = [int(n) for n in re.findall(r"wrote (\d+) data files? \(", r.stdout)]
    assert len(files_per_rank) == 3 and min(files_per_rank) > 0, r.stdout
    manifest = json.loads((out / ".streammerge" / "manifest.json").read_text())
    single_manifest = json.loads((single / ".streammerge" / "manifest.json").read_text())
    def content(m: dict) -> dict:  # mtimes differ between the two runs, of course
        return {f: (e["size"], e["crc32"]) for f, e in m["files"].items()}

    assert manifest["complete"] and content(manifest) == content(single_manifest)
    assert manifest["fingerprint"] == single_manifest["fingerprint"]
    assert not list((out / ".streammerge").glob("manifest.part-*"))
    assert check_merge(out, "tiny", dtype=__import__("torch").bfloat16) > 0


def test_torchrun_resume_rewrites_only_what_is_missing(ckpt, single, tmp_path):
    out = tmp_path / "out"
    _torchrun(ckpt, out, nproc=2)
    shards = sorted(out.glob("model-*.safetensors"))
    victim = shards[-1]
    victim.unlink()
    (out / "model.safetensors.index.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    r = _torchrun(ckpt, out, nproc=2)
    assert "wrote" in r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == kept  # reused, not rewritten
    assert _files(out) == _files(single)


def test_several_slurm_tasks_without_torchrun_are_refused(ckpt, tmp_path):
    out = tmp_path / "out"
    env = dict(_env(), SLURM_NTASKS="4", SLURM_PROCID="1")
    r = subprocess.run([sys.executable, "-m", "streammerge", str(ckpt), str(out), *OPTS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "torchrun" in r.stderr
    assert not out.exists()
