"""Merge + push against the Hub-compatible server: real checkpoints, real merges, real huggingface_hub client.

Uploads take the Git LFS path (HF_HUB_DISABLE_XET); the Xet path is covered in test_hub.py. The CLI
runs as a subprocess with HF_TOKEN/HF_ENDPOINT in its environment, as a user would run it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from ckpt_tools import copy_actor, diverge, rewrite_rank, run_together
from hubserver import FINE_TOKEN, ORG_READER_TOKEN, OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN, HubServer
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

import streammerge
from streammerge.errors import CheckpointError
from streammerge.hub.publish import ConfigError, PushConfig, load_push_config, merge_and_push, push_settings
from streammerge.hub.retry import PushError, RetryPolicy

pytestmark = [pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.usefixtures("hub_env")]

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.5)
SHARD = "200KB"  # the tiny model in 3 shards + index
BAD_TOKEN = "hf_ThisIsNotAValidTokenButLooksLikeOne42"
LAST = {"model.safetensors.index.json", "config.json", "README.md"}




@pytest.fixture
def run_dir(make_ckpt, tmp_path) -> Path:
    """A private copy of a training run folder: global_step_2/actor (with optimizer files) + tracker."""
    run = tmp_path / "run"
    shutil.copytree(make_ckpt().parents[1], run)
    return run


def opts(hub: HubServer, **kw) -> dict:
    return {"token": WRITE_TOKEN, "endpoint": hub.endpoint, "retry": FAST, "optimizer": False,
            "max_shard_size": SHARD, **kw}


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".streammerge" not in p.relative_to(out).parts}


def remote_files(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {p: hub.file_bytes(repo_id, p, revision) for p in hub.files(repo_id, revision) if p != ".gitattributes"}


def completed_puts(hub: HubServer, since: int = 0) -> Counter:
    return Counter(e.path for e in hub.log[since:] if e.method == "PUT" and e.path.startswith("/_lfs/")
                   and e.status == 200)


def cli_env(hub: HubServer, token: str = WRITE_TOKEN) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": token, "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def cli_command(args: list) -> list[str]:
    return [sys.executable, "-m", "streammerge", *map(str, args)]


def cli(args: list[str], hub: HubServer, token: str = WRITE_TOKEN, wait: bool = True, quiet_hf: bool = True):
    env = cli_env(hub, token)
    if not quiet_hf:  # huggingface_hub's own progress bars as a user gets them
        env.pop("HF_HUB_DISABLE_PROGRESS_BARS")
    cmd = cli_command(args)
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


# ---- the CLI --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_push_to_private_org_repo_uploads_merged_files_index_last(hub, make_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = cli([make_ckpt(), out, "--push", "--repo-id", "tiny", "--organization", "acme", "--private",
                "--max-shard-size", SHARD, "--max-files-per-commit", "3"], hub)
    assert proc.returncode == 0, proc.stderr

    assert hub.repo("acme/tiny").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).repo_info("acme/tiny")
    local = local_files(out)
    assert remote_files(hub, "acme/tiny") == local
    manifest = json.loads((out / ".streammerge" / "manifest.json").read_text())
    entries = hub.files("acme/tiny")
    shards = [f for f in manifest["files"] if f.endswith(".safetensors")]
    assert len(shards) >= 2
    for name in shards:  # the Hub stores each shard under the sha256 the writer computed
        assert entries[name].lfs
        assert entries[name].sha256 == manifest["files"][name]["sha256"] == hashlib.sha256(local[name]).hexdigest()

    last = LAST | {"optimizer/optimizer.safetensors.index.json"}
    commits = hub.commit_log("acme/tiny")[1:]
    first_last = next(i for i, c in enumerate(commits) if last & set(c.added))
    assert first_last >= 2  # the data files alone took several commits (at most 3 files each)
    assert not any(last & set(c.added) for c in commits[:first_last])
    assert all(set(c.added) <= last for c in commits[first_last:])
    assert set().union(*(c.added for c in commits[first_last:])) == last
    for index_name in ("model.safetensors.index.json", "optimizer/optimizer.safetensors.index.json"):
        index = json.loads(local[index_name])
        folder = index_name.rpartition("/")[0]
        named = {f"{folder}/{f}" if folder else f for f in index["weight_map"].values()}
        assert named <= set(commits[first_last - 1].tree)  # every file an index names was there before it

    card = local["README.md"].decode()
    config = json.loads(local["config.json"])
    for fact in ("| Source checkpoint | `global_step_2/actor` |", "| Training step | `2` |",
                 "| FSDP world size | `2` |", f"| Weights dtype | `{config['dtype']}` |",
                 "| Optimizer state included | `yes` |", 'from_pretrained("acme/tiny"'):
        assert fact in card
    assert str(make_ckpt()) not in card  # no local path on the Hub
    assert f"acme/tiny/commit/{hub.repo('acme/tiny').branches['main']}" in proc.stdout
    assert WRITE_TOKEN not in proc.stdout + proc.stderr


def test_cli_kill_mid_upload_then_rerun_sends_nothing_twice(hub, make_ckpt, tmp_path):
    out = tmp_path / "out"
    args = [make_ckpt(), out, "--push", "--repo-id", "alice/tiny", "--max-shard-size", SHARD, "--no-optimizer",
            "--upload-workers", "1"]
    held = hub.hang(r"^/_lfs/(upload|part)/", method="PUT", skip=2)  # 2 blobs go through, the 3rd is held
    proc = cli(args, hub, wait=False)
    held.kill_when_entered(proc, timeout=60)
    first = completed_puts(hub)
    assert sum(first.values()) == 2
    assert not hub.requests("POST", r"/commit/")

    n_log = len(hub.log)
    proc = cli(args, hub)
    assert proc.returncode == 0, proc.stderr
    second = completed_puts(hub, n_log)
    assert second and not set(first) & set(second)  # nothing the Hub had was sent again
    assert max(completed_puts(hub).values()) == 1
    assert "reused" in proc.stdout  # the merge re-used its finished files
    assert remote_files(hub, "alice/tiny") == local_files(out)
    assert len(hub.commit_log("alice/tiny")) == 2
    report = streammerge.verify(out, make_ckpt())  # the folder survived the kill intact, every tensor checked
    assert report.ok and report.tensors_checked, report.summary()


def test_cli_sigterm_during_an_upload_stops_at_once(hub, make_ckpt, tmp_path):
    """A scheduler's SIGTERM while a shard is uploading: the process said "interrupted" but stayed until the held
    upload ended (then retried it); a scheduler follows with SIGKILL. It must exit at once, 130, one line."""
    import signal
    import time
    held = hub.hang(r"^/_lfs/(upload|part)/", method="PUT", max_wait=30)
    proc = cli([make_ckpt(), tmp_path / "out", "--push", "--repo-id", "alice/tiny", "--max-shard-size", SHARD,
                "--no-optimizer"], hub, wait=False)
    assert held.entered.wait(60)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10 and proc.returncode == 130, err
    assert err.strip().splitlines() == ["streammerge: interrupted; finished files are kept, rerun the same command "
                                        "to resume"], err


def test_cli_bad_token_fails_before_merging_with_advice_and_never_prints_it(hub, make_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = cli([make_ckpt(), out, "--push", "--repo-id", "tiny", "--no-optimizer"], hub, token=BAD_TOKEN)
    assert proc.returncode == 4
    assert "hf auth login" in proc.stderr and "HF_TOKEN" in proc.stderr and "Traceback" not in proc.stderr
    assert BAD_TOKEN not in proc.stdout + proc.stderr
    assert not out.exists()  # checked before the merge started
    assert not hub.repos


def test_cli_config_block_nested_in_training_config_with_flag_override(hub, make_ckpt, tmp_path):
    config = tmp_path / "ppo_trainer.yaml"
    config.write_text(
        "data:\n  train_batch_size: 8\n"
        "trainer:\n  project_name: demo\n  total_epochs: 1\n"
        "  hf_upload:\n    enabled: true\n    repo_id: from-file\n    organization: acme\n"
        "    private: true\n    optimizer_save_mode: null\n")
    out = tmp_path / "out"
    assert make_ckpt().joinpath("optim_world_size_2_rank_0.pt").is_file()  # there is optimizer state to skip
    proc = cli([make_ckpt(), out, "--config", config, "--repo-id", "from-flag", "--max-shard-size", SHARD], hub)
    assert proc.returncode == 0, proc.stderr

    assert ("model", "acme/from-file") not in hub.repos
    assert hub.repo("acme/from-flag").private
    remote = remote_files(hub, "acme/from-flag")
    assert remote == local_files(out)
    assert not [p for p in remote if p.startswith("optimizer")]
    assert "| Optimizer state included | `no` |" in remote["README.md"].decode()


def _broken_actor(make_ckpt, tmp_path) -> Path:
    """A copy of the checkpoint whose second model rank file was cut short (as a failed copy leaves it)."""
    actor = tmp_path / "broken" / "global_step_2" / "actor"
    shutil.copytree(make_ckpt(), actor)
    rank1 = actor / "model_world_size_2_rank_1.pt"
    rank1.write_bytes(rank1.read_bytes()[:100_000])
    return actor


def test_cli_merge_that_fails_creates_nothing_on_the_hub(hub, make_ckpt, tmp_path):
    proc = cli([_broken_actor(make_ckpt, tmp_path), tmp_path / "out", "--push", "--repo-id", "tiny"], hub)
    assert proc.returncode == 2 and "truncated" in proc.stderr, proc.stderr
    assert not hub.requests("POST", r"^/api/repos/create$") and not hub.repos
    assert hub.requests("GET", r"^/api/whoami-v2$")  # the token was checked before the merge

    # A token that cannot write there still fails before the merge, without creating anything either.
    for token, repo_id, words in ((READ_TOKEN, "tiny", "read-only"), (OTHER_TOKEN, "acme/tiny", "not a member")):
        out = tmp_path / f"out-{token}"
        proc = cli([make_ckpt(), out, "--push", "--repo-id", repo_id, "--no-optimizer"], hub, token=token)
        assert proc.returncode == 4 and words in proc.stderr and "write access" in proc.stderr, proc.stderr
        assert not out.exists() and not hub.repos and token not in proc.stdout + proc.stderr


def test_seed_api_merge_that_fails_creates_nothing_on_the_hub(hub, make_ckpt, tmp_path):
    hub.create_repo("alice/kept")
    before = hub.repo("alice/kept").branches.copy()
    for repo_id, revision in (("tiny", None), ("alice/kept", "step-2")):
        failed = streammerge.upload_checkpoint_to_hf(_broken_actor(make_ckpt, tmp_path / repo_id), repo_id=repo_id,
                                                     token=WRITE_TOKEN, endpoint=hub.endpoint, retry=FAST,
                                                     revision=revision, raise_on_error=False)
        assert not failed.ok and failed.error_kind == "CheckpointError" and "truncated" in failed.error
    assert list(hub.repos) == [("model", "alice/kept")] and hub.repo("alice/kept").branches == before
    assert not hub.requests("POST", r"^/api/repos/create$") and not hub.requests("POST", r"/branch/")


@pytest.mark.slow
def test_cli_merge_failing_after_its_first_upload_removes_the_repo_and_branch_it_made(hub, make_ckpt, tmp_path):
    """The optimizer.pt (1.8 MB) passes a 1 MB file-size limit only after the model shards were uploading."""
    hub.create_repo("alice/kept")
    hub.add_files("alice/kept", {"notes.txt": b"kept"})
    main_before = hub.repo("alice/kept").branches["main"]
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000)); "
            "sys.argv[0] = 'streammerge'; runpy.run_module('streammerge', run_name='__main__')")
    targets = (["--repo-id", "tiny"], ["--repo-id", "alice/kept", "--revision", "step-2"])
    runs = run_together(*([sys.executable, "-c", code, str(make_ckpt()), str(tmp_path / f"out{n}"), "--push",
                           "--max-shard-size", SHARD, "--optimizer-format", "torch", "--workers", "1", *extra]
                          for n, extra in enumerate(targets)), env=cli_env(hub), cwd=ROOT, timeout=120)
    for n, proc in enumerate(runs):
        assert proc.returncode == 2 and "optimizer.pt: 1.8 MB exceeds the file-size limit (ulimit -f)" in proc.stderr, \
            proc.stderr
        assert (tmp_path / f"out{n}" / "model-00001-of-00003.safetensors").is_file()
    assert [e.status for e in hub.requests("POST", r"^/api/repos/create$")] == [200]  # made for the first file
    assert [e.status for e in hub.requests("POST", r"/branch/step-2$")] == [200]
    assert hub.requests("POST", r"/preupload/")  # ... and uploads had started
    assert [e.status for e in hub.requests("DELETE")] == [200, 200]
    assert list(hub.repos) == [("model", "alice/kept")]  # the new repo is gone, the existing one untouched
    assert hub.repo("alice/kept").branches == {"main": main_before}
    assert not hub.requests("POST", r"/commit/")


# ---- the library ----------------------------------------------------------------------------
def test_existing_repo_gets_a_branch_and_a_rerun_sends_nothing(hub, make_ckpt, tmp_path):
    hub.create_repo("alice/tiny")
    hub.add_files("alice/tiny", {"notes.txt": b"kept", "config.json": b"{}"})
    out = tmp_path / "out"

    first = merge_and_push(make_ckpt(), out, "alice/tiny", revision="step-2", **opts(hub))
    assert first.ok and first.commit_oid == hub.repo("alice/tiny").branches["step-2"]
    assert remote_files(hub, "alice/tiny", "step-2") == {**local_files(out), "notes.txt": b"kept"}
    assert remote_files(hub, "alice/tiny", "main") == {"notes.txt": b"kept", "config.json": b"{}"}

    n_log, n_commits = len(hub.log), len(hub.commit_log("alice/tiny", "step-2"))
    again = merge_and_push(make_ckpt(), out, "alice/tiny", revision="step-2", **opts(hub))
    assert not [e for e in hub.log[n_log:] if e.method == "PUT" or "/commit/" in e.path]
    assert len(hub.commit_log("alice/tiny", "step-2")) == n_commits
    assert again.commits == 0 and sorted(again.unchanged) == sorted(again.files)
    assert again.merge.reused and again.commit_oid == first.commit_oid


def test_transient_errors_and_rate_limits_are_retried(hub, make_ckpt, tmp_path):
    hub.reset_next(r"^/api/repos/create$")
    hub.fail_next(r"/preupload/", status=500)
    hub.fail_next(r"/info/lfs/objects/batch$", status=502)
    hub.fail_next(r"^/_lfs/(upload|part)/", status=503, method="PUT")
    hub.fail_next(r"/commit/", status=429, retry_after=1)
    out = tmp_path / "out"
    result = merge_and_push(make_ckpt(), out, "tiny", **opts(hub))

    assert result.ok and remote_files(hub, "alice/tiny") == local_files(out)
    assert [e.status for e in hub.requests("POST", r"^/api/repos/create$")] == [None, 200]
    commits = hub.requests("POST", r"/commit/")
    assert [e.status for e in commits] == [429, 200] and commits[1].t_start - commits[0].t_end >= 1.0
    assert [e.status for e in hub.requests("PUT")].count(503) == 1
    assert max(completed_puts(hub).values()) == 1
    assert len(hub.commit_log("alice/tiny")) == 2


def test_lost_commit_answer_is_not_committed_twice(hub, make_ckpt, tmp_path):
    hub.drop_after_commit()
    result = merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub))
    commits = hub.commit_log("alice/tiny")
    assert len(commits) == 2 and result.commit_oid == commits[-1].oid
    assert [e.status for e in hub.requests("POST", r"/commit/")] == [None]
    assert remote_files(hub, "alice/tiny") == local_files(tmp_path / "out")


def test_failed_push_keeps_the_merged_folder_and_the_rerun_finishes(hub, make_ckpt, tmp_path):
    out = tmp_path / "out"
    streammerge.merge(make_ckpt(), out, optimizer=False, max_shard_size=SHARD)
    before = {k: hashlib.sha256(v).hexdigest() for k, v in local_files(out).items()}
    hub.fail_next(r"/commit/", status=500, n=FAST.attempts)
    with pytest.raises(PushError) as exc_info:
        merge_and_push(make_ckpt(), out, "tiny", **opts(hub))
    assert exc_info.value.kind == "failed" and "running the same push again" in str(exc_info.value)
    after = {k: hashlib.sha256(v).hexdigest() for k, v in local_files(out).items()}
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {"README.md"}
    assert not [p for p in out.rglob("*") if "tmp" in p.name]
    assert set(hub.files("alice/tiny")) == {".gitattributes"}

    n_log = len(hub.log)
    merge_and_push(make_ckpt(), out, "tiny", **opts(hub))
    assert not completed_puts(hub, n_log)  # every blob was already uploaded by the failed run
    assert remote_files(hub, "alice/tiny") == local_files(out)


def test_config_block_is_found_anywhere_and_checked(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("hf_upload:\n  enabled: true\n  repo_id: alice/m\n  private: true\n  optimizer_save_mode: null\n")
    assert load_push_config(top) == PushConfig(True, "alice/m", None, True, None)
    nested = tmp_path / "nested.yaml"
    nested.write_text("actor_rollout_ref:\n  model: {path: Qwen/Qwen2.5-0.5B}\n"
                      "trainer:\n  logger: [console]\n  hf_upload:\n    enabled: false\n    repo_id: m\n"
                      "    organization: acme\n    optimizer_save_mode: full\n")
    cfg = load_push_config(nested)
    assert (cfg.enabled, cfg.repo_id, cfg.organization, cfg.optimizer) == (False, "m", "acme", True)
    # flags win over the file
    cfg = push_settings(nested, push=True, repo_id="other", private=True, optimizer_save_mode="none")
    assert (cfg.enabled, cfg.repo_id, cfg.organization, cfg.private, cfg.optimizer) == (True, "other", "acme", True,
                                                                                       False)
    no_repo = tmp_path / "no-repo.yaml"  # no repo_id anywhere: the push names it after the output folder
    no_repo.write_text("hf_upload: {enabled: true}\n")
    assert (push_settings(no_repo).repo_id, push_settings(no_repo).private) == (None, None)
    for text, message in [("trainer: {epochs: 1}\n", "no hf_upload"),
                          ("a: {hf_upload: {repo_id: x}}\nb: {hf_upload: {repo_id: y}}\n", "several different"),
                          ("hf_upload: {enabled: true, repo_id: '${oc.env:USER}/m'}\n", "interpolation"),
                          ("hf_upload: {enabled: true, optimizer_save_mode: sharded}\n", "optimizer_save_mode"),
                          ("hf_upload: {enabled: '${oc.env:HF_UPLOAD,false}', repo_id: m}\n", "not true or false"),
                          ("hf_upload: {enabled: 'false', repo_id: m}\n", "--no-push"),
                          ("hf_upload: {enabled: true, private: 'yes'}\n", "--no-private"),
                          ("hf_upload: [1, 2]\n", "mapping")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            push_settings(bad)


# ---- the seed workflow's API ------------------------------------------------------------------
def test_seed_function_picks_the_step_in_a_run_folder_and_uses_the_default_out_dir(hub, run_dir, make_ckpt,
                                                                                   monkeypatch):
    other = run_dir / "global_step_5"  # a newer step with other weights; the tracker names it
    shutil.copytree(make_ckpt(seed=1), other / "actor")
    (run_dir / "latest_checkpointed_iteration.txt").write_text("5")
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)

    result = streammerge.upload_checkpoint_to_hf(checkpoint_dir=run_dir, repo_id="tiny", step=2,
                                                 optimizer_save_mode=None, max_shard_size=SHARD, retry=FAST)
    assert result.ok and result.step == 2
    assert result.out_dir == (run_dir / "global_step_2" / "actor-hf").resolve()
    step2 = streammerge.merge(run_dir / "global_step_2", run_dir.parent / "check", optimizer=False,
                              max_shard_size=SHARD)
    weights = {f.filename for f in step2.files if f.filename.endswith(".safetensors")}
    remote = remote_files(hub, "alice/tiny")
    assert remote == local_files(result.out_dir)
    assert weights and all(remote[w] == (step2.out_dir / w).read_bytes() for w in weights)
    assert "| Training step | `2` |" in remote["README.md"].decode()
    assert hub.commit_log("alice/tiny")[-1].summary == "Upload model from step 2 with streammerge"

    with pytest.raises(CheckpointError, match="step 5, not of step 2"):
        streammerge.upload_checkpoint_to_hf(checkpoint_dir=other / "actor", repo_id="tiny", step=2,
                                            raise_on_error=True)


def test_seed_uploader_class_and_raise_on_error_false_returns_the_failure(hub, make_ckpt, tmp_path, caplog):
    uploader = streammerge.HuggingFaceUploader(repo_id="tiny", optimizer_save_mode=None, token=WRITE_TOKEN,
                                               endpoint=hub.endpoint, max_shard_size=SHARD, retry=FAST)
    result = uploader.upload_from_checkpoint_dir(checkpoint_dir=make_ckpt(), step=2, out_dir=tmp_path / "out")
    assert result.ok and remote_files(hub, "alice/tiny") == local_files(tmp_path / "out")

    bad = streammerge.HuggingFaceUploader(repo_id="tiny", optimizer_save_mode=None, token=BAD_TOKEN,
                                          endpoint=hub.endpoint, retry=FAST, raise_on_error=False)
    with caplog.at_level(logging.ERROR):
        failed = bad.upload_from_checkpoint_dir(checkpoint_dir=make_ckpt(), out_dir=tmp_path / "out2")
    assert not failed.ok and failed.error_kind == "auth" and "hf auth login" in failed.error
    assert "hf auth login" in caplog.text and BAD_TOKEN not in caplog.text + failed.error

    failed = streammerge.upload_checkpoint_to_hf(make_ckpt(), None, "tiny", optimizer_save_mode=None, token=BAD_TOKEN,
                                                 endpoint=hub.endpoint, retry=FAST, raise_on_error=False)
    assert not failed.ok and failed.error_kind == "auth"
    with pytest.raises(PushError):
        streammerge.upload_checkpoint_to_hf(make_ckpt(), None, "tiny", optimizer_save_mode=None, token=BAD_TOKEN,
                                            endpoint=hub.endpoint, retry=FAST, raise_on_error=True)


def _actor_without_hf(make_ckpt, tmp_path) -> Path:
    actor = tmp_path / "run" / "global_step_2" / "actor"
    shutil.copytree(make_ckpt(), actor, ignore=shutil.ignore_patterns("huggingface"))
    return actor


def test_model_name_as_local_folder_gives_config_and_tokenizer_only(hub, make_ckpt, tmp_path):
    base = tmp_path / "base_model"
    shutil.copytree(make_ckpt() / "huggingface", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "streammerge_marker": 7}))
    (base / "model.safetensors").write_bytes(b"not these weights")
    (base / "README.md").write_text("the base model's card")
    actor = _actor_without_hf(make_ckpt, tmp_path)

    result = streammerge.upload_checkpoint_to_hf(actor, model_name=str(base), repo_id="tiny", step=2,
                                                 optimizer_save_mode=None, token=WRITE_TOKEN, endpoint=hub.endpoint,
                                                 retry=FAST)
    remote = remote_files(hub, "alice/tiny")
    assert json.loads(remote["config.json"])["streammerge_marker"] == 7
    assert remote["tokenizer.json"] == (base / "tokenizer.json").read_bytes()
    assert remote["model.safetensors"] == (result.out_dir / "model.safetensors").read_bytes() != b"not these weights"
    assert "the base model's card" not in remote["README.md"].decode()
    assert not hub.requests("GET", r"/resolve/")  # a local folder is read offline


def test_model_name_as_a_hub_cache_snapshot_folder_follows_its_links_into_blobs(make_ckpt, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/config.json links to ../../blobs/<hash>; a link out of the cache
    repo is still refused."""
    repo = tmp_path / "hub_cache" / "models--acme--base"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in (make_ckpt() / "huggingface").iterdir():
        blob = repo / "blobs" / f"blob-{p.name}"
        blob.write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(Path("..", "..", "blobs", blob.name))
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    (snap / "notes.txt").symlink_to(secret)  # not a file streammerge takes from a model_name: not looked at
    actor = _actor_without_hf(make_ckpt, tmp_path)

    streammerge.merge(actor, tmp_path / "out", model_name=str(snap), optimizer=False)
    hf = make_ckpt() / "huggingface"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()

    (snap / "special_tokens_map.json").unlink(missing_ok=True)
    (snap / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="links outside"):
        streammerge.merge(actor, tmp_path / "out2", model_name=str(snap), optimizer=False)


def test_a_linked_folder_in_huggingface_is_carried_and_pushed(hub, make_ckpt, tmp_path):
    """huggingface/additional_chat_templates/ as a link to a folder in the checkpoint: its template was left out of
    OUT (Path.rglob does not enter linked folders), and push_folder left it out of the repo. A linked folder outside
    the checkpoint is refused, as a linked file is."""
    from streammerge.hub.pusher import push_folder

    actor = tmp_path / "actor"
    shutil.copytree(make_ckpt(), actor)
    (actor / "templates").mkdir()
    template = b"{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (actor / "templates" / "tool_use.jinja").write_bytes(template)
    (actor / "huggingface" / "additional_chat_templates").symlink_to(Path("..", "templates"),
                                                                      target_is_directory=True)
    out = tmp_path / "out"
    streammerge.merge(actor, out, optimizer=False)
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_bytes() == template
    moved = tmp_path / "out_templates"
    shutil.move(out / "additional_chat_templates", moved)
    (out / "additional_chat_templates").symlink_to(moved, target_is_directory=True)
    push_folder(out, "alice/tiny-linked", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    assert remote_files(hub, "alice/tiny-linked")["additional_chat_templates/tool_use.jinja"] == template

    outside = tmp_path / "outside_templates"
    shutil.copytree(actor / "templates", outside)
    (actor / "huggingface" / "additional_chat_templates").unlink()
    (actor / "huggingface" / "additional_chat_templates").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="links outside"):
        streammerge.merge(actor, tmp_path / "out2", optimizer=False)


def test_model_name_from_the_hub_fetches_config_and_tokenizer_only(hub, make_ckpt, tmp_path):
    hf = make_ckpt() / "huggingface"
    hub.create_repo("acme/base")
    hub.add_files("acme/base", {**{p.name: p.read_bytes() for p in hf.iterdir()},
                                "model.safetensors": os.urandom(300_000), "README.md": b"base card"})
    actor = _actor_without_hf(make_ckpt, tmp_path)

    result = merge_and_push(actor, tmp_path / "out", "tiny", model_name="acme/base", **opts(hub))
    fetched = {e.path.rsplit("/", 1)[-1] for e in hub.requests("GET", r"^/acme/base/resolve/")}
    assert fetched == {p.name for p in hf.iterdir()}  # config, generation config, tokenizer; no weights, no card
    remote = remote_files(hub, "alice/tiny")
    assert remote["config.json"] == (result.out_dir / "config.json").read_bytes()
    assert json.loads(remote["config.json"])["vocab_size"] == json.loads((hf / "config.json").read_text())["vocab_size"]
    assert "base_model: acme/base" in remote["README.md"].decode()


def test_optimizer_full_pushes_an_optimizer_export_that_loads_as_the_card_says(hub, make_ckpt, tmp_path):
    result = streammerge.upload_checkpoint_to_hf(make_ckpt(), repo_id="tiny", optimizer_save_mode="full",
                                                 token=WRITE_TOKEN, endpoint=hub.endpoint, retry=FAST,
                                                 out_dir=tmp_path / "out")
    remote = remote_files(hub, "alice/tiny")
    assert [p for p in remote if p.startswith("optimizer/")]
    assert remote == local_files(result.out_dir)
    card = remote["README.md"].decode()
    assert "| Optimizer state included | `yes` |" in card and "load_optimizer_state_dict" in card

    # The card's recipe, on the files as the Hub serves them.
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    download = tmp_path / "download"
    for path, data in remote.items():
        (download / path).parent.mkdir(parents=True, exist_ok=True)
        (download / path).write_bytes(data)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(download))
    optimizer = torch.optim.AdamW(model.parameters())
    set_optimizer_state_dict(model, optimizer, streammerge.load_optimizer_state_dict(f"{download}/optimizer"),
                             options=StateDictOptions(flatten_optimizer_state_dict=True))
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all(s["exp_avg"].abs().sum() > 0 for s in state.values())


@pytest.mark.slow
def test_cli_torch_optimizer_format_gets_a_model_card_that_says_so_and_loads(hub, make_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = cli([make_ckpt(), out, "--push", "--repo-id", "tiny", "--max-shard-size", SHARD,
                "--optimizer-format", "torch"], hub)
    assert proc.returncode == 0, proc.stderr
    remote = remote_files(hub, "alice/tiny")
    assert [p for p in remote if p.startswith("optimizer/")] == ["optimizer/optimizer.pt"]
    card = remote["README.md"].decode()
    assert "| Optimizer state included | `yes` |" in card
    assert "`optimizer/optimizer.pt`" in card and "weights_only=True" in card
    assert "safetensors" not in card.split("## Optimizer state")[1]

    download = tmp_path / "download"  # the card's recipe, on the files as the Hub serves them
    (download / "optimizer").mkdir(parents=True)
    (download / "optimizer" / "optimizer.pt").write_bytes(remote["optimizer/optimizer.pt"])
    state = streammerge.load_optimizer_state_dict(f"{download}/optimizer")
    assert state["state"] and state["param_groups"]


def test_push_over_an_earlier_push_deletes_its_stale_shards_and_optimizer_in_the_last_commit(hub, make_ckpt, tmp_path):
    user_files = {"notes.txt": b"kept", "extra/model-00001-of-00009.safetensors": b"a user's own file",
                  "model_fp8.safetensors": b"not one of ours", "optimizer.txt": b"not in optimizer/"}
    first = merge_and_push(make_ckpt(), tmp_path / "first", "tiny", **opts(hub, optimizer=True, max_shard_size="100KB"))
    old_shards = {p for p in first.files if p.startswith("model-")}
    assert len(old_shards) > 3 and [p for p in first.files if p.startswith("optimizer/")]
    hub.add_files("alice/tiny", user_files, "the user's own files")

    out = tmp_path / "second"  # 3 shards, no optimizer, no card: everything else of the first push is stale
    second = merge_and_push(make_ckpt(), out, "tiny", **opts(hub, model_card=False, max_files_per_commit=3))
    assert {p for p in second.files if p.startswith("model-")} == {f"model-0000{i}-of-00003.safetensors"
                                                                  for i in (1, 2, 3)}
    remote = remote_files(hub, "alice/tiny")
    assert remote == {**local_files(out), **user_files}  # the first push's card went too (it described that push)
    assert sorted(second.deleted) == sorted(p for p in first.files if p in old_shards or p.startswith("optimizer/")
                                            or p == "README.md") != []
    assert "stale files of an earlier push deleted" in second.summary()
    commits = hub.commit_log("alice/tiny")[-second.commits:]
    assert second.commits > 1 and not any(c.deleted for c in commits[:-1])
    assert sorted(commits[-1].deleted) == sorted(second.deleted)  # with the new index, in one step
    assert "model.safetensors.index.json" in commits[-1].added
    index = json.loads(remote["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) <= set(remote)

    n_commits = len(hub.commit_log("alice/tiny"))  # the same push again: nothing to send, nothing to delete
    again = merge_and_push(make_ckpt(), out, "tiny", **opts(hub, model_card=False))
    assert again.commits == 0 and not again.deleted and len(hub.commit_log("alice/tiny")) == n_commits


def test_a_push_without_a_card_into_the_folder_of_one_with_a_card_leaves_the_folder_as_the_repo(hub, make_ckpt,
                                                                                                     tmp_path):
    """--no-model-card over an earlier push into the same OUT: the Hub's generated card is deleted (it described that
    push), and so is the local copy, so that the folder and the repo hold the same files."""
    out = tmp_path / "out"
    first = merge_and_push(make_ckpt(), out, "tiny", **opts(hub))
    assert "README.md" in first.files and (out / "README.md").is_file()
    second = merge_and_push(make_ckpt(), out, "tiny", **opts(hub, model_card=False))
    assert second.deleted == ["README.md"]
    assert local_files(out) == remote_files(hub, "alice/tiny") and not (out / "README.md").exists()
    assert streammerge.verify(out, make_ckpt()).ok
    # a card the user edited in the folder is theirs: it stays
    merge_and_push(make_ckpt(), out, "tiny", **opts(hub))
    edited = (out / "README.md").read_bytes() + b"\nmy notes\n"
    (out / "README.md").write_bytes(edited)
    merge_and_push(make_ckpt(), out, "tiny", **opts(hub, model_card=False))
    assert (out / "README.md").read_bytes() == edited


def test_a_later_step_of_the_same_model_in_several_commits_ends_with_its_index_and_config(hub, make_ckpt, tmp_path):
    """Step B of the same run (same shapes and config: its index and config are byte for byte step A's) pushed over
    step A in several commits. The first commit hides index and config (its shards overwrite A's), so the last must
    commit them again though the Hub held them unchanged when the push began: else the repo ends with B's shards
    and no index or config. No commit in between holds a config."""
    a = copy_actor(make_ckpt(), tmp_path / "a" / "actor")
    b = copy_actor(make_ckpt(), tmp_path / "b" / "actor")

    def step(sd: dict) -> None:  # every weight moves, as a training step moves it
        for v in sd.values():
            local = getattr(v, "_local_tensor", v)
            if local.is_floating_point():
                local.add_(1.0)

    for f in b.glob("model_world_size_*.pt"):
        rewrite_rank(f, step)
    merge_and_push(a, tmp_path / "out_a", "tiny", **opts(hub))
    since = len(hub.commit_log("alice/tiny"))
    second = merge_and_push(b, tmp_path / "out_b", "tiny", **opts(hub, max_files_per_commit=2))
    local_a, local_b = local_files(tmp_path / "out_a"), local_files(tmp_path / "out_b")
    for name in ("model.safetensors.index.json", "config.json"):
        assert local_a[name] == local_b[name]
    assert local_a["model-00001-of-00003.safetensors"] != local_b["model-00001-of-00003.safetensors"]
    assert second.ok and second.commits > 1 and remote_files(hub, "alice/tiny") == local_b
    assert "config.json" not in second.unchanged
    commits = hub.commit_log("alice/tiny")[since:]
    assert "config.json" in commits[0].deleted and not any("config.json" in c.tree for c in commits[:-1])


def _hub_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("streammerge")]


def _readme_reads(hub: HubServer, since: int = 0) -> list[str]:
    return [e.path for e in hub.log[since:] if e.method == "GET" and e.path.endswith("/README.md")]


def test_push_without_a_card_deletes_the_untouched_card_an_earlier_push_generated(hub, make_ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    first = merge_and_push(make_ckpt(), out, "tiny", **opts(hub))
    assert "README.md" in first.files and (out / "README.md").is_file()

    n_log = len(hub.log)  # delete_stale=False: the push deletes nothing, so it does not even look at the card
    kept = merge_and_push(make_ckpt(), out, "tiny", **opts(hub, model_card=False, delete_stale=False))
    assert not kept.deleted and hub.file_bytes("alice/tiny", "README.md") == (out / "README.md").read_bytes()
    assert not _readme_reads(hub, n_log)

    caplog.set_level(logging.INFO)
    second = merge_and_push(make_ckpt(), out, "tiny", **opts(hub, model_card=False))  # as --no-model-card does
    assert second.deleted == ["README.md"] and "1 stale files of an earlier push deleted" in second.summary()
    assert remote_files(hub, "alice/tiny") == {p: b for p, b in local_files(out).items() if p != "README.md"}
    last = hub.commit_log("alice/tiny")[-1]
    assert last.deleted == ["README.md"] and last.oid == second.commit_oid  # in the push's one (last) commit
    assert any("deleted README.md, the model card an earlier push generated" in m for m in caplog.messages)
    assert not _hub_warnings(caplog)


def test_push_without_a_card_keeps_an_edited_card_and_warns_it_may_describe_an_earlier_upload(hub, make_ckpt,
                                                                                             tmp_path, caplog):
    merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub))
    api = HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN)
    card = Path(api.hf_hub_download("alice/tiny", "README.md", local_dir=tmp_path / "download")).read_text()
    edited = card.replace("with streammerge.", "with streammerge. It scores 71% on our evals.", 1).encode()
    assert edited != card.encode()
    api.upload_file(path_or_fileobj=edited, path_in_repo="README.md", repo_id="alice/tiny")

    caplog.set_level(logging.INFO)
    second = merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub, model_card=False))
    assert not second.deleted and hub.file_bytes("alice/tiny", "README.md") == edited
    warnings = _hub_warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "alice/tiny: README.md" in warnings[0] and "may describe an earlier upload" in warnings[0]


def test_a_card_edited_after_the_push_looked_at_it_is_kept(hub, make_ckpt, tmp_path, caplog):
    """The card is judged at the head the last commit is made on: an edit landing in between makes that
    commit fail (412), and the retry finds the edited card."""
    caplog.set_level(logging.INFO)
    merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub))
    edited = hub.file_bytes("alice/tiny", "README.md") + b"\nOur notes.\n"
    hub.before_next(r"/commit/", lambda: hub.add_files("alice/tiny", {"README.md": edited}, "an edit"))
    result = merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub, model_card=False))
    assert [e.status for e in hub.requests("POST", r"/commit/")][-1] == 412  # then nothing was left to commit
    assert not result.deleted and result.commits == 0 and hub.file_bytes("alice/tiny", "README.md") == edited
    assert not any("deleted" in m or "was applied" in m for m in caplog.messages)
    assert len([m for m in _hub_warnings(caplog) if "may describe an earlier upload" in m]) == 1


def test_push_without_a_card_keeps_a_readme_the_user_wrote_and_says_nothing(hub, make_ckpt, tmp_path, caplog):
    user_readme = b"---\nlicense: mit\ntags:\n- rl\n---\n# My model\n\nTrained by me.\n"
    hub.create_repo("alice/tiny")
    hub.add_files("alice/tiny", {"README.md": user_readme}, "the user's card")
    caplog.set_level(logging.INFO)

    result = merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub, model_card=False))
    assert not result.deleted and hub.file_bytes("alice/tiny", "README.md") == user_readme
    branch = merge_and_push(make_ckpt(), tmp_path / "out", "tiny", revision="step-2", **opts(hub, model_card=False))
    assert not branch.deleted and hub.file_bytes("alice/tiny", "README.md", "step-2") == user_readme  # a new branch

    fresh = merge_and_push(make_ckpt(), tmp_path / "out", "fresh", **opts(hub, model_card=False))  # a new repo
    assert fresh.ok and not fresh.deleted and "README.md" not in hub.files("alice/fresh")
    assert not _hub_warnings(caplog)


def test_readme_in_the_checkpoints_huggingface_folder_replaces_a_generated_card(hub, make_ckpt, tmp_path, caplog):
    merge_and_push(make_ckpt(), tmp_path / "first", "tiny", **opts(hub))
    actor = tmp_path / "ckpt" / "actor"
    shutil.copytree(make_ckpt(), actor)
    (actor / "huggingface" / "README.md").write_text("# The user's own card\n")
    caplog.set_level(logging.INFO)

    second = merge_and_push(actor, tmp_path / "second", "tiny", **opts(hub))
    assert hub.file_bytes("alice/tiny", "README.md") == b"# The user's own card\n"
    assert "README.md" in second.files and not second.deleted and not _hub_warnings(caplog)


# ---- fixes of user-facing problems ---------------------------------------------------------------
def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_seed_calls_never_raise_they_log_one_error_line_and_return_the_failure(hub, run_dir, make_ckpt, tmp_path,
                                                                               caplog, monkeypatch):
    """A failed upload at the end of training must not crash the training: the seed's calls, made as
    the seed makes them, log one error line and return ok=False, whatever went wrong."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    broken = _broken_actor(make_ckpt, tmp_path)
    with socket.socket() as s:  # a port nobody listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = [  # (what, HF_TOKEN, call, error kind, words in the error)
        ("bad token", BAD_TOKEN, lambda: streammerge.upload_checkpoint_to_hf(
            checkpoint_dir=run_dir, repo_id="tiny", step=2), "auth", "hf auth login"),
        ("no token", None, lambda: streammerge.upload_checkpoint_to_hf(
            checkpoint_dir=run_dir, repo_id="tiny", step=2), "auth", "no Hugging Face token to"),
        ("missing checkpoint", WRITE_TOKEN, lambda: streammerge.upload_checkpoint_to_hf(
            checkpoint_dir=tmp_path / "no-such-run", repo_id="tiny", step=2), "CheckpointError", "no-such-run"),
        ("merge error", WRITE_TOKEN, lambda: streammerge.HuggingFaceUploader(
            repo_id="tiny", optimizer_save_mode="full").upload_from_checkpoint_dir(checkpoint_dir=broken, step=2),
         "CheckpointError", "truncated"),
        ("no permission", READ_TOKEN, lambda: streammerge.HuggingFaceUploader(
            repo_id="tiny").upload_from_checkpoint_dir(checkpoint_dir=run_dir, step=2), "permission", "read-only"),
        # the one extra argument: the default patience for an unreachable Hub is over a minute
        ("network", WRITE_TOKEN, lambda: streammerge.upload_checkpoint_to_hf(
            checkpoint_dir=run_dir, repo_id="tiny", step=2, endpoint=unreachable, retry=FAST),
         "failed", "after 5 attempts"),
    ]
    for what, token, call, kind, words in cases:
        if token is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            monkeypatch.setenv("HF_TOKEN", token)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            result = call()
        assert not result.ok and result.error_kind == kind and words in result.error, (what, result.error)
        errors = _errors(caplog)
        assert len(errors) == 1 and "\n" not in errors[0] and words in errors[0], (what, errors)
        assert token is None or token not in caplog.text + result.error, what
    assert not hub.repos and not (run_dir / "global_step_2" / "actor-hf").exists()  # refused before merging

    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    with pytest.raises(PushError):
        streammerge.upload_checkpoint_to_hf(checkpoint_dir=run_dir, repo_id="tiny", step=2, raise_on_error=True)
    with pytest.raises(CheckpointError):
        streammerge.HuggingFaceUploader(repo_id="tiny", raise_on_error=True).upload_from_checkpoint_dir(
            checkpoint_dir=tmp_path / "no-such-run")
    with pytest.raises(PushError):  # the library's own entry points keep raising
        merge_and_push(run_dir, tmp_path / "out", "tiny", endpoint=hub.endpoint, retry=FAST)


def test_cli_push_without_repo_id_names_a_private_repo_after_the_output_folder(hub, make_ckpt, tmp_path):
    out = tmp_path / "Qwen2 tiny (step 2)"
    proc = cli([make_ckpt(), out, "--push", "--no-optimizer", "--max-shard-size", SHARD], hub)
    assert proc.returncode == 0, proc.stderr
    repo = hub.repo("alice/Qwen2-tiny-step-2")
    assert repo.private and remote_files(hub, "alice/Qwen2-tiny-step-2") == local_files(out)
    assert f"{hub.endpoint}/alice/Qwen2-tiny-step-2 " in proc.stdout  # the repo's URL, printed

    # The library does the same; with an explicit private=False the repo is public.
    named = merge_and_push(make_ckpt(), tmp_path / "lib-model", None, organization="acme", **opts(hub))
    assert named.repo_id == "acme/lib-model" and hub.repo("acme/lib-model").private
    assert named.url == f"{hub.endpoint}/acme/lib-model"
    public = merge_and_push(make_ckpt(), tmp_path / "lib-public", None, private=False, **opts(hub))
    assert public.repo_id == "alice/lib-public" and not hub.repo("alice/lib-public").private
    with pytest.raises(ConfigError, match="repo_id"):  # the default folder (actor-hf) names no model
        merge_and_push(make_ckpt(), None, None, **opts(hub))


def test_cli_token_that_cannot_write_there_is_refused_before_merging(hub, make_ckpt, tmp_path):
    for token, args, refusal in (
            (ORG_READER_TOKEN, ["--repo-id", "tiny", "--organization", "acme"],
             "token of user carol cannot write to organization acme (carol has the read-only 'read' role in acme)"),
            (FINE_TOKEN, ["--repo-id", "tiny"],
             "token of user alice cannot write to alice/tiny (fine-grained token without repo.write on alice)")):
        out = tmp_path / f"out-{token}"
        proc = cli([make_ckpt(), out, "--push", *args, "--no-optimizer"], hub, token=token)
        assert proc.returncode == 4, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and refusal in lines[0] and token not in proc.stderr, proc.stderr
        assert not out.exists() and not hub.repos  # before the merge, nothing created


def test_cli_repo_id_or_branch_the_hub_refuses_is_refused_before_merging(hub, make_ckpt, tmp_path):
    """Found after the whole merge, these ended in exit 4 with 'run the same push again' advice that cannot help."""
    for i, args in enumerate((["--repo-id", "alice/my model"], ["--repo-id", "a/b/c"], ["--repo-id", "m.git"],
                              ["--repo-id", "tiny", "--revision", "a..b"],
                              ["--repo-id", "tiny", "--revision", "0" * 40],
                              ["--repo-id", "alice/m", "--organization", "acme"])):
        out = tmp_path / f"out-{i}"
        proc = cli([make_ckpt(), out, "--push", *args, "--no-optimizer"], hub)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert not out.exists() and not hub.repos
    run = tmp_path / "run"  # watch refuses at once too, rather than logging a traceback at every look
    shutil.copytree(make_ckpt().parents[1], run)
    proc = cli(["watch", run, "--push", "--repo-id", "alice/m", "--organization", "acme", "--once"], hub)
    assert proc.returncode == 2 and "another namespace" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_key_in_hf_upload_is_an_error_naming_the_closest_key(hub, make_ckpt, tmp_path):
    config = tmp_path / "ppo_trainer.yaml"
    config.write_text("trainer:\n  hf_upload:\n    enabled: true\n    repo_id: tiny\n    privat: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'privat' in hf_upload: did you mean 'private'\?"):
        load_push_config(config)
    config.write_text("hf_upload: {enabled: true, repo_id: tiny, colour: blue}\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'.*known keys: enabled, repo_id"):
        load_push_config(config)

    config.write_text("hf_upload:\n  enabled: true\n  repo_id: tiny\n  privat: true\n")
    out = tmp_path / "out"
    proc = cli([make_ckpt(), out, "--config", config], hub)
    assert proc.returncode == 2 and "did you mean 'private'?" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not hub.repos and not hub.requests()  # a typo never publishes anything


@pytest.mark.parametrize("text, words", [
    ("a:\n  hf_upload: {enabled: true}\nb:\n  hf_upload: {enabled: false}\n",
     "several different hf_upload: blocks (a.hf_upload, b.hf_upload); keep one"),
    ("hf_upload: [enabled]\n", "hf_upload must be a mapping of enabled, repo_id"),
    ("hf_upload: {enabled: true, optimizer_save_mode: half}\n",
     "hf_upload.optimizer_save_mode: expected 'full' or null, got 'half'"),
])
def test_every_config_error_names_the_config_file(tmp_path, text, words):
    """Two of them named only the block: with a run's several YAML files the user could not tell which one."""
    config = tmp_path / "ppo_trainer.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_push_config(config)
    assert str(e.value).startswith(f"{config}: ") and words in str(e.value), e.value


def test_cli_private_on_an_existing_public_repo_warns_how_to_change_it(hub, make_ckpt, tmp_path):
    hub.create_repo("alice/tiny")  # public
    proc = cli([make_ckpt(), tmp_path / "out", "--push", "--repo-id", "tiny", "--private", "--no-optimizer"], hub)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "public" in line]
    assert len(warnings) == 1 and warnings[0].startswith("streammerge: warning: alice/tiny exists"), proc.stderr
    for words in ("alice/tiny exists and is public", "does not change", "hf repos settings alice/tiny --private",
                  "update_repo_settings"):
        assert words in warnings[0], warnings[0]
    assert not hub.repo("alice/tiny").private and hub.files("alice/tiny")["config.json"]

    proc = cli([make_ckpt(), tmp_path / "out2", "--push", "--repo-id", "tiny", "--no-optimizer"], hub)
    assert proc.returncode == 0 and "public" not in proc.stderr  # no --private asked: nothing to say


def test_card_of_a_weights_only_dcp_push_does_not_say_transformers_loads_it(hub, tmp_path):
    """No config.json: the card must not tell readers to load the repo with transformers, nor tag it veRL/FSDP."""
    import torch
    import torch.distributed.checkpoint as dcp
    ckpt = tmp_path / "dcp"
    dcp.save({"layer.weight": torch.randn(8, 4)}, checkpoint_id=ckpt)  # one process, no process group
    proc = cli([ckpt, tmp_path / "out", "--weights-only", "--push", "--repo-id", "alice/w"], hub)
    assert proc.returncode == 0, proc.stderr
    card = ModelCard(hub.file_bytes("alice/w", "README.md").decode())
    assert card.data.library_name is None and "from_pretrained" not in card.text and "no `config.json`" in card.text
    assert "torch-dcp" in card.data.tags and "verl" not in card.data.tags
    assert set(remote_files(hub, "alice/w")) == {"model.safetensors", "README.md"}


def test_model_card_has_no_local_paths(hub, run_dir, tmp_path):
    result = streammerge.upload_checkpoint_to_hf(checkpoint_dir=run_dir, repo_id="tiny", step=2, token=WRITE_TOKEN,
                                                 endpoint=hub.endpoint, optimizer_save_mode=None, retry=FAST,
                                                 raise_on_error=True)
    card = hub.file_bytes("alice/tiny", "README.md").decode()
    assert "| Source checkpoint | `global_step_2/actor` |" in card and "| Training step | `2` |" in card
    assert str(tmp_path) not in card and str(run_dir.resolve()) not in card and result.ok


def test_cli_no_progress_silences_huggingface_hub_progress_bars(hub, make_ckpt, tmp_path):
    args = [make_ckpt(), tmp_path / "out", "--push", "--repo-id", "tiny", "--no-optimizer"]
    proc = cli([*args, "--no-progress"], hub, quiet_hf=False)
    assert proc.returncode == 0, proc.stderr
    assert "%|" not in proc.stderr and "B/s" not in proc.stderr, proc.stderr


def test_push_result_repr_is_short(hub, make_ckpt, tmp_path):
    result = merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub))
    text = repr(result)
    assert len(text) < 400 and "alice/tiny" in text and "Plan" not in text, text
    assert result.merge.plans  # everything is still there, just not in the repr


def test_push_with_verify_commits_nothing_when_verify_fails(hub, make_ckpt, tmp_path):
    """--verify beside --push (or --config) checks the folder before the commit: an HSDP replica that differs (the
    merge reads one replica) fails it, nothing is committed, the repo made for the first upload is removed again,
    and the exit code is verify's 1."""
    ckpt = copy_actor(make_ckpt(world_size=4, mesh=(2, 2)), tmp_path / "actor")
    diverge(ckpt / "model_world_size_4_rank_2.pt", "model.layers.0.")
    config = tmp_path / "train.yaml"
    config.write_text("hf_upload:\n  enabled: false\n")
    proc, unpushed = run_together(
        cli_command([ckpt, tmp_path / "out", "--push", "--repo-id", "tiny", "--verify", "--no-optimizer"]),
        cli_command([ckpt, tmp_path / "out2", "--config", config, "--verify", "--no-optimizer"]),
        env=cli_env(hub), cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "differ from its replica" in proc.stdout and "push failed: verify found 1 problem(s): nothing committed" \
        in proc.stdout, proc.stdout
    assert not hub.requests("POST", r"/commit/") and not hub.repos
    assert unpushed.returncode == 1 and "differ from its replica" in unpushed.stdout, unpushed.stdout + unpushed.stderr
    proc = cli([make_ckpt(), tmp_path / "out3", "--push", "--repo-id", "tiny", "--verify", "--no-optimizer"], hub)
    assert proc.returncode == 0 and ": OK (" in proc.stdout and "pushed to" in proc.stdout, proc.stdout


def test_a_push_into_a_repo_holding_a_peft_adapter_commits_nothing(hub, make_ckpt, tmp_path):
    """The revision holds adapter_config.json at its top (someone's LoRA): transformers would load the repo as that
    adapter, not as the pushed model. Not ours to delete: the push fails before its commit, saying what to do."""
    hub.create_repo("alice/tuned")
    adapter = {"peft_type": "LORA", "base_model_name_or_path": "other/base", "r": 8, "lora_alpha": 16,
               "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    hub.add_files("alice/tuned", {"adapter_config.json": json.dumps(adapter).encode()})
    head = hub.repo("alice/tuned").branches["main"]
    proc = cli([make_ckpt(), tmp_path / "out", "--push", "--repo-id", "alice/tuned", "--no-optimizer"], hub)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "holds adapter_config.json at its top" in proc.stderr and "nothing was committed" in proc.stderr, proc.stderr
    assert hub.repo("alice/tuned").branches["main"] == head
    # to another branch of the same repo (made from main, so it holds the file too): refused alike
    proc = cli([make_ckpt(), tmp_path / "out", "--push", "--repo-id", "alice/tuned", "--revision", "merged",
                "--no-optimizer"], hub)
    assert proc.returncode == 4 and "holds adapter_config.json" in proc.stderr, proc.stderr
    assert hub.repo("alice/tuned").branches == {"main": head}  # the branch the push made for it is gone again
    assert [e.status for e in hub.requests("POST", r"/branch/merged$")] == [200]


def test_cli_push_over_another_models_tokenizer_is_refused_in_one_line(hub, make_ckpt, tmp_path):
    """The revision holds a slow tokenizer's vocab.json and merges.txt and a generation_config.json of another model;
    the merge brings tokenizer.json, tokenizer_config.json and its own generation_config.json. transformers would load
    that vocabulary with these weights: exit 4, one line naming the two files and the fix, nothing committed."""
    hub.create_repo("alice/other")
    hub.add_files("alice/other", {"vocab.json": b"{}", "merges.txt": b"#version: 0.2\n",
                                  "generation_config.json": b"{}"})
    head = hub.repo("alice/other").branches["main"]
    proc = cli([make_ckpt(), tmp_path / "out", "--push", "--repo-id", "alice/other", "--no-optimizer"], hub)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "merges.txt, vocab.json (another model's tokenizer" in line[0], proc.stderr
    assert "generation_config.json" not in line[0] and "nothing was committed: delete them" in line[0]
    assert hub.repo("alice/other").branches["main"] == head
    assert {"tokenizer.json", "generation_config.json"} <= set(local_files(tmp_path / "out"))


def test_a_push_with_a_card_keeps_a_readme_someone_edited_or_wrote(hub, make_ckpt, tmp_path, caplog):
    """The generated card replaces only a card a push generated untouched: a card edited on the Hub, or the owner's
    own README, stays (with one warning), and the rest of the push is committed."""
    merge_and_push(make_ckpt(), tmp_path / "out", "tiny", **opts(hub))
    edited = hub.file_bytes("alice/tiny", "README.md") + b"\nIt scores 71% on our evals.\n"
    hub.add_files("alice/tiny", {"README.md": edited}, "an edit")
    caplog.set_level(logging.INFO)
    second = merge_and_push(make_ckpt(), tmp_path / "out2", "tiny", **opts(hub, max_shard_size="100KB"))
    assert second.ok and second.commits >= 1 and hub.file_bytes("alice/tiny", "README.md") == edited
    warnings = [m for m in _hub_warnings(caplog) if "README.md" in m]
    assert len(warnings) == 1 and "edited since it was generated" in warnings[0], warnings
    assert set(remote_files(hub, "alice/tiny")) - {"README.md"} == set(local_files(tmp_path / "out2")) - {"README.md"}

    user_readme = b"---\nlicense: mit\n---\n# My model\n"
    hub.create_repo("alice/own")
    hub.add_files("alice/own", {"README.md": user_readme}, "the user's card")
    merge_and_push(make_ckpt(), tmp_path / "out3", "alice/own", **opts(hub))
    assert hub.file_bytes("alice/own", "README.md") == user_readme
