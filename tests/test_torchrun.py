"""torchrun scale-out: one writer per host (local rank 0) writes its host's share of the files; the result
equals a one-process merge, and on one host no rank imports torch."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streammerge.testing.presets import check_merge, make_checkpoint

pytestmark = pytest.mark.slow  # real multi-process or multi-GB runs
ROOT = Path(__file__).resolve().parents[1]

OPTS = ["--max-shard-size", "100KB", "--no-optimizer", "--no-progress", "--dtype", "bfloat16"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT")
WROTE = re.compile(r"^wrote (\d+) data files? \(.*peak RSS (\d+) MiB", re.M)
IDLE = re.compile(r"^streammerge: rank (\d+) \(local rank (\d+) on host (\d+)\): nothing to write, .*"
                  r"peak RSS (\d+) MiB", re.M)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in TORCHRUN_VARS:
        env.pop(k, None)
    return env


def _torchrun(ckpt: Path, out: Path, nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "streammerge", str(ckpt), str(out), *OPTS]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_hosts(ckpt: Path, out: Path | list[Path], logs: Path, hosts: int, nproc: int,
                    host_opts: tuple[list[str], ...] = (), env: dict | None = None) -> list[str]:
    """One torchrun agent per "host", all on this machine (static rendezvous); each agent's stdout, or, when a host
    has options of its own (`host_opts`), each agent's (exit code, stderr) without checking them. `out` may give each
    host an output folder of its own (hosts without a shared file system)."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for node in range(hosts):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={hosts}", f"--node-rank={node}",
               f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "streammerge", str(ckpt), str(out[node] if isinstance(out, list) else out), *OPTS,
               *(host_opts[node] if host_opts else [])]
        with open(logs / f"host{node}.out", "w") as o, open(logs / f"host{node}.err", "w") as e:
            agents.append(subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **(env or {})}, stdout=o, stderr=e))
    try:
        codes = [a.wait(timeout=150) for a in agents]
    finally:
        for a in agents:  # on a failure or timeout; SIGTERM lets the agent stop its workers too
            if a.poll() is None:
                a.send_signal(signal.SIGTERM)
        for a in agents:
            try:
                a.wait(timeout=15)
            except subprocess.TimeoutExpired:
                a.kill()
    if host_opts:
        return [f"{code}\n{(logs / f'host{n}.err').read_text()}" for n, code in enumerate(codes)]
    outs = [(logs / f"host{node}.out").read_text() for node in range(hosts)]
    assert codes == [0] * hosts, "\n".join(outs + [(logs / f"host{n}.err").read_text() for n in range(hosts)])
    return outs


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".streammerge" not in p.parts}


def _manifest_content(folder: Path) -> tuple[dict, dict]:
    """The manifest, and its files' (size, crc32): mtimes differ between runs, of course."""
    m = json.loads((folder / ".streammerge" / "manifest.json").read_text())
    return m, {f: (e["size"], e["crc32"]) for f, e in m["files"].items()}


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


@pytest.fixture(scope="module")
def torch_rss() -> int:
    """Peak RSS (MiB) of a process that only imports torch: any rank that imported it peaks above this."""
    code = "import torch; from streammerge.pipeline import peak_rss; print(peak_rss() // 2**20)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def _same_as_single(out: Path, single: Path) -> None:
    expected = _files(single)
    assert len([f for f in expected if f.endswith(".safetensors")]) >= 3  # enough files to share out
    assert _files(out) == expected
    manifest, content = _manifest_content(out)
    single_manifest, single_content = _manifest_content(single)
    assert manifest["complete"] and content == single_content
    assert manifest["fingerprint"] == single_manifest["fingerprint"]
    assert not list((out / ".streammerge").glob("manifest.part-*"))


def test_one_host_has_one_writer_and_no_rank_imports_torch(ckpt, single, torch_rss, tmp_path):
    out = tmp_path / "out"
    r = _torchrun(ckpt, out, nproc=3)
    _same_as_single(out, single)
    wrote, idle = WROTE.findall(r.stdout), IDLE.findall(r.stdout)
    assert len(wrote) == 1 and int(wrote[0][0]) >= 3, r.stdout  # local rank 0 wrote every file
    assert sorted((int(rank), int(local), int(host)) for rank, local, host, _ in idle) == [(1, 1, 0), (2, 2, 0)], \
        r.stdout + r.stderr
    rss = [int(w[1]) for w in wrote] + [int(i[3]) for i in idle]
    assert max(rss) < torch_rss / 2, (rss, torch_rss)  # torch would cost more than the whole rank does
    assert check_merge(out, "tiny", dtype=__import__("torch").bfloat16) > 0


def test_several_hosts_write_one_share_each(ckpt, single, tmp_path):
    out = tmp_path / "out"
    outs = _torchrun_hosts(ckpt, out, tmp_path / "logs", hosts=2, nproc=2)
    _same_as_single(out, single)
    for host, text in enumerate(outs):
        wrote, idle = WROTE.findall(text), IDLE.findall(text)
        assert len(wrote) == 1 and int(wrote[0][0]) > 0, text  # local rank 0 wrote this host's share
        assert [(int(local), int(host_)) for _, local, host_, _ in idle] == [(1, host)], text


def test_several_hosts_resume_rewrites_only_what_is_missing(ckpt, single, tmp_path):
    out = tmp_path / "out"
    _torchrun_hosts(ckpt, out, tmp_path / "logs1", hosts=2, nproc=1)
    shards = sorted(out.glob("model-*.safetensors"))
    victim = shards[-1]
    victim.unlink()
    (out / "model.safetensors.index.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    outs = _torchrun_hosts(ckpt, out, tmp_path / "logs2", hosts=2, nproc=1)
    assert [int(w[0]) for text in outs for w in WROTE.findall(text)] == [1], outs  # only the victim
    assert "finished by an earlier run" in "".join(outs)
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == kept  # reused, not rewritten
    assert _files(out) == _files(single)


def test_hosts_that_plan_differently_each_stop_with_one_line(ckpt, tmp_path):
    """Host 1 was given another dtype (its plan differs): whichever host opens the folder second refuses it, and the
    other one's writer learns at the barrier that its peer stopped. Each says so in one line, neither exits 0."""
    ends = _torchrun_hosts(ckpt, tmp_path / "out", tmp_path / "logs", hosts=2, nproc=1,
                           host_opts=([], ["--dtype", "float32"]))
    for end in ends:
        code, err = end.split("\n", 1)
        assert code != "0", ends
        lines = [ln for ln in err.splitlines() if ln.startswith("streammerge:")]
        assert len(lines) == 1 and "internal error" not in lines[0], ends  # (torchrun's agent adds its own traceback)
    assert any("another host's writer stopped" in e for e in ends), ends
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_a_host_that_dies_before_the_others_meet_it_stops_them_in_one_line(ckpt, tmp_path):
    """Host 1's rank stops before the process group exists (here: a bad option): another host's agent does not stop
    host 0's rank, which must not wait the writers' day-long barrier timeout, and says why in one line."""
    ends = _torchrun_hosts(ckpt, tmp_path / "out", tmp_path / "logs", hosts=2, nproc=1,
                           host_opts=([], ["--dtype", "nonsense"]), env={"STREAMMERGE_TORCHRUN_STARTUP_S": "3"})
    code, err = ends[0].split("\n", 1)
    lines = [ln for ln in err.splitlines() if ln.startswith("streammerge:")]
    assert code != "0" and len(lines) == 1, ends
    assert "another host's ranks did not start or stopped before the merge began" in lines[0], ends


def test_hosts_without_a_shared_output_folder_publish_nothing_and_fail(ckpt, tmp_path):
    """Each host writes its share into a folder of its own (node-local disks): host 0 must not write an index naming
    files its folder lacks, and neither host exits 0."""
    outs = [tmp_path / "host0" / "out", tmp_path / "host1" / "out"]
    ends = _torchrun_hosts(ckpt, outs, tmp_path / "logs", hosts=2, nproc=1, host_opts=([], []))
    for end in ends:
        code, err = end.split("\n", 1)
        lines = [ln for ln in err.splitlines() if ln.startswith("streammerge:")]
        assert code != "0" and len(lines) == 1 and "internal error" not in lines[0], ends
    assert "file system every host shares" in ends[0], ends
    assert not (outs[0] / "model.safetensors.index.json").exists() and not (outs[0] / "config.json").exists()


def test_several_slurm_tasks_without_torchrun_are_refused(ckpt, tmp_path):
    out = tmp_path / "out"
    env = dict(_env(), SLURM_NTASKS="4", SLURM_PROCID="1")
    r = subprocess.run([sys.executable, "-m", "streammerge", str(ckpt), str(out), *OPTS], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "torchrun" in r.stderr
    assert not out.exists()


def test_rank_variables_from_another_launcher_are_refused_at_once(make_ckpt, tmp_path: Path) -> None:
    """RANK and WORLD_SIZE inherited from a launcher that is not torchrun (a Kubeflow pod, a Ray worker) with no other
    rank coming: joining a process group would wait for hours, silently. One line, exit 2, nothing written."""
    actor = make_ckpt()
    env = dict(_env(), RANK="0", WORLD_SIZE="24", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    r = subprocess.run([sys.executable, "-m", "streammerge", str(actor), str(tmp_path / "out"), *OPTS], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not by torchrun" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()
