"""The upload engine against a Hub-compatible server, both real: huggingface_hub talks HTTP to it.

Uploads take the Git LFS path (HF_HUB_DISABLE_XET), except in the test that shows what a user with
Xet on sees against a Hub without Xet.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from hubserver import FINE_TOKEN, ORG_READER_TOKEN, OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN, HubServer
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from streammerge.hub.card import card_state, is_untouched_card, make_model_card
from streammerge.hub.commits import matches, plan_commits
from streammerge.hub.pusher import HubPusher, push_folder
from streammerge.hub.retry import PushError, RetryPolicy

# huggingface_hub's own LFS PUTs use httpx's deprecated data=<file>.
pytestmark = [pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.usefixtures("hub_env")]

ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=5, base_delay=0.05, max_delay=0.5)
SHARDS = {"model-00001-of-00004.safetensors": 2_500_000,  # multipart (server chunk: 1 MiB)
          "model-00002-of-00004.safetensors": 1_500_000,
          "model-00003-of-00004.safetensors": 700_000,  # single PUT
          "model-00004-of-00004.safetensors": 300_000}
LAST = {"config.json", "model.safetensors.index.json", "optimizer/optimizer.safetensors.index.json"}




def write_random(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))


@pytest.fixture
def folder(tmp_path) -> Path:
    """A merge output: 4 shards + index, config, tokenizer config, optimizer/, and merge scratch files."""
    out = tmp_path / "out"
    for i, (name, size) in enumerate(SHARDS.items()):
        write_random(out / name, size, seed=i)
    write_random(out / "optimizer" / "optimizer-00001-of-00001.safetensors", 400_000, seed=99)
    weight_map = {f"layers.{i}.weight": name for i, name in enumerate(SHARDS)}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(SHARDS.values())}, "weight_map": weight_map}))
    (out / "optimizer" / "optimizer.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"state.x.exp_avg": "optimizer-00001-of-00001.safetensors"}}))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (out / ".streammerge").mkdir()
    (out / ".streammerge" / "state.json").write_text("{}")
    (out / "model-00005.safetensors.streammerge-tmp").write_bytes(b"partial")
    return out


def expected_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".streammerge" not in p.as_posix()}


def remote_files(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {p: hub.file_bytes(repo_id, p, revision) for p in hub.files(repo_id, revision) if p != ".gitattributes"}


def tree_digest(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.rglob("*") if p.is_file()}


def completed_puts(hub: HubServer) -> Counter:
    """Completed blob uploads, by LFS object (multipart: by object and part)."""
    return Counter(e.path for e in hub.requests("PUT", r"^/_lfs/") if e.status == 200)


def run_client(code: str, env: dict[str, str], **kw) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ---- behaviour --------------------------------------------------------------------------------
def test_push_folder_uploads_every_file_with_its_content(hub, folder):
    info = push_folder(folder, "tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)

    assert hub.repo("alice/tiny").private is False
    assert remote_files(hub, "alice/tiny") == expected_files(folder)
    entries = hub.files("alice/tiny")
    for name in SHARDS:  # LFS objects are stored under the sha256 of the local file
        assert entries[name].lfs and entries[name].sha256 == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert not entries["config.json"].lfs
    assert info.oid == hub.repo("alice/tiny").branches["main"]
    # Everything fits in one commit: one atomic change after the Hub's initial commit.
    assert [c.summary for c in hub.commit_log("alice/tiny")] == ["initial commit", "Upload model with streammerge"]
    # The real client can read it back.
    got = hf_hub_download("alice/tiny", "model-00001-of-00004.safetensors", endpoint=hub.endpoint,
                          token=WRITE_TOKEN, cache_dir=folder.parent / "cache")
    assert Path(got).read_bytes() == (folder / "model-00001-of-00004.safetensors").read_bytes()


def test_private_repo_in_organization_with_token_and_endpoint_from_env(hub, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    push_folder(folder, "tiny", organization="acme", private=True, retry=FAST)

    repo = hub.repo("acme/tiny")
    assert repo.private
    assert remote_files(hub, "acme/tiny") == expected_files(folder)
    for token in (False, OTHER_TOKEN):  # anonymous, and a user outside the org, cannot see it
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=hub.endpoint, token=token).repo_info("acme/tiny")


def test_data_files_are_committed_before_index_and_config(hub, folder):
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=3,
                retry=FAST)

    commits = hub.commit_log("alice/tiny")[1:]
    assert len(commits) == 3  # 6 data files in 2 commits, then the 3 "last" files
    assert set(commits[-1].added) == LAST
    for commit in commits[:-1]:
        assert not LAST & set(commit.added)
    # Each index only names files that were already on the Hub.
    before_last = commits[-2].tree
    index = json.loads(hub.file_bytes("alice/tiny", "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) <= set(before_last)
    assert remote_files(hub, "alice/tiny") == expected_files(folder)


def test_a_push_over_an_earlier_one_never_shows_a_mix_of_the_two(hub, folder):
    """The second push rewrites every shard under the same names in several commits, and its second commit fails.
    No commit of it, and not the head it leaves, may hold the old index over some new and some old shards (a model
    of two training steps that loads): each holds the old push whole, or no index and no config."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=3, retry=FAST)
    push_folder(folder, "alice/tiny", **opts)
    old = remote_files(hub, "alice/tiny")
    n_old = len(hub.commit_log("alice/tiny"))
    for i, (name, size) in enumerate(SHARDS.items()):
        write_random(folder / name, size, seed=100 + i)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "step": 4}))
    hub.fail_next(r"/commit/", n=20, status=422, skip=1)
    with pytest.raises(PushError):
        push_folder(folder, "alice/tiny", **opts)
    hub.clear_faults()
    new_commits = hub.commit_log("alice/tiny")[n_old:]
    assert new_commits and "model-00001-of-00004.safetensors" in new_commits[0].added
    for c in new_commits:
        assert not {"config.json", "model.safetensors.index.json"} & set(c.tree), c.summary
    push_folder(folder, "alice/tiny", **opts)  # the rerun completes the new push
    assert remote_files(hub, "alice/tiny") == expected_files(folder) != old


# ---- what each revision a push makes loads ------------------------------------------------------
READ_WITH = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "chat_template*",
             "generation_config.json")


def loaded(hub: HubServer, commit) -> dict[str, tuple | None]:
    """What a loader reads at ``commit`` as (config, weights, tokenizer and generation files), or None where it would
    load nothing.

    transformers: config.json, and model.safetensors where there is one, else every file the index names. vLLM:
    config.json, and every top-level *.safetensors file, only those the index names where there is an index.
    """
    tree = commit.tree
    config = tree.get("config.json")
    if config is None:
        return {"transformers": None, "vllm": None}
    index = tree.get("model.safetensors.index.json")
    named = None if index is None else set(json.loads(hub.blobs[index.sha256])["weight_map"].values())

    beside = frozenset((p, e.sha256) for p, e in tree.items() if any(fnmatch.fnmatchcase(p, w) for w in READ_WITH))

    def state(files: set[str] | None) -> tuple | None:
        if not files or not files <= set(tree):
            return None
        return config.sha256, frozenset((f, tree[f].sha256) for f in files), beside

    top = {p for p in tree if "/" not in p and p.endswith(".safetensors")}
    return {"transformers": state({"model.safetensors"} if "model.safetensors" in tree else named),
            "vllm": state(top if named is None else top & named)}


def assert_never_a_mix(hub: HubServer, repo_id: str, revision: str, since: int, before: bool = True) -> None:
    """Every commit of ``revision`` from number ``since`` on loads nothing, the push's own model whole, or (with
    ``before``) what commit ``since - 1`` loaded whole; and the head loads the push's model."""
    log = hub.commit_log(repo_id, revision)
    old, new = loaded(hub, log[since - 1]), loaded(hub, log[-1])
    assert all(new.values()), new
    for c in log[since:]:
        for loader, state in loaded(hub, c).items():
            allowed = [None, new[loader]] + ([old[loader]] if before else [])
            assert state in allowed, (c.summary, loader, sorted(c.tree))


@pytest.mark.parametrize("revision", ["main", "step"])
def test_a_later_step_in_several_commits_commits_again_the_index_and_config_it_hid(hub, folder, revision):
    """Step 2 overwrites step 1's shards (same names and sizes: its index and config are byte for byte step 1's) in
    several commits, on main or on the branch step 1 went to. Its first commit hides index and config, so its last
    must commit them again though the Hub had them unchanged when it began: else the head loads nothing."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=3, retry=FAST, revision=revision)
    push_folder(folder, "alice/tiny", **opts)
    old = remote_files(hub, "alice/tiny", revision)
    since = len(hub.commit_log("alice/tiny", revision))
    for i, (name, size) in enumerate(SHARDS.items()):
        write_random(folder / name, size, seed=100 + i)
    push_folder(folder, "alice/tiny", **opts)
    assert remote_files(hub, "alice/tiny", revision) == expected_files(folder) != old
    assert len(hub.commit_log("alice/tiny", revision)) - since > 1
    assert_never_a_mix(hub, "alice/tiny", revision, since)


def test_a_tokenizer_file_in_an_early_commit_hides_the_model_it_would_load_with(hub, folder):
    """Step 2 keeps step 1's weights but brings a chat template, an optimizer export in files of other names and a new
    config, in several commits: the chat template in an early commit would load with step 1's config (a mix), so
    that commit hides the config."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=2, retry=FAST)
    push_folder(folder, "alice/tiny", **opts)
    since = len(hub.commit_log("alice/tiny"))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "optimizer" / "optimizer-00001-of-00001.safetensors").unlink()  # in two files of other names now
    for i in (1, 2):
        write_random(folder / "optimizer" / f"optimizer-0000{i}-of-00002.safetensors", 200_000, seed=90 + i)
    (folder / "optimizer" / "optimizer.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        f"state.{i}.exp_avg": f"optimizer-0000{i}-of-00002.safetensors" for i in (1, 2)}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "step": 2}))
    push_folder(folder, "alice/tiny", **opts)
    assert remote_files(hub, "alice/tiny") == expected_files(folder)
    assert len(hub.commit_log("alice/tiny")) - since > 1
    assert_never_a_mix(hub, "alice/tiny", "main", since)


def single_file_folder(root: Path) -> Path:
    """One model.safetensors, its config and tokenizer config, and an optimizer export of three files."""
    write_random(root / "model.safetensors", 600_000, seed=7)
    for i in range(1, 4):
        write_random(root / "optimizer" / f"optimizer-0000{i}-of-00003.safetensors", 100_000, seed=70 + i)
    (root / "optimizer" / "optimizer.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        f"state.{i}.exp_avg": f"optimizer-0000{i}-of-00003.safetensors" for i in range(1, 4)}}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return root


@pytest.mark.parametrize("order", ["single-over-sharded", "sharded-over-single"])
def test_a_single_file_model_over_a_sharded_one_or_the_reverse_never_loads_a_mix(hub, folder, tmp_path, order):
    """transformers loads model.safetensors before any index, vLLM every *.safetensors where there is no index: the
    first commits of a push of several that bring one layout beside the other's entry point would load weights of
    two pushes (or the new weights with the old config), unless that commit hides the entry point."""
    single = single_file_folder(tmp_path / "single")
    first, second = (folder, single) if order == "single-over-sharded" else (single, folder)
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=2, retry=FAST)
    push_folder(first, "alice/tiny", **opts)
    since = len(hub.commit_log("alice/tiny"))
    push_folder(second, "alice/tiny", **opts)
    assert remote_files(hub, "alice/tiny") == expected_files(second)
    assert len(hub.commit_log("alice/tiny")) - since > 1
    assert_never_a_mix(hub, "alice/tiny", "main", since)


def test_a_branch_made_from_main_never_loads_mains_model(hub, folder, tmp_path):
    """main holds step 1 (4 shards); step 5 goes to a new branch in several commits, in 3 shards of other names. The
    branch starts as main's copy: its first commit hides main's index and config, so that no commit of the branch
    loads main's model (or a mix of the two) under the branch's name."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=2, retry=FAST)
    push_folder(folder, "alice/tiny", **opts)
    since = len(hub.commit_log("alice/tiny"))
    step5 = tmp_path / "step5"
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for i, name in enumerate(names):
        write_random(step5 / name, 300_000, seed=50 + i)
    (step5 / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 900_000}, "weight_map": {f"layers.{i}.weight": n for i, n in enumerate(names)}}))
    (step5 / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "step": 5}))
    (step5 / "tokenizer_config.json").write_bytes((folder / "tokenizer_config.json").read_bytes())
    push_folder(step5, "alice/tiny", revision="step-5", **opts)
    assert remote_files(hub, "alice/tiny", "step-5") == expected_files(step5)  # main's shards and optimizer: stale
    assert len(hub.commit_log("alice/tiny", "step-5")) - since > 1
    assert_never_a_mix(hub, "alice/tiny", "step-5", since, before=False)
    assert remote_files(hub, "alice/tiny") == expected_files(folder)  # main untouched


def test_another_models_tokenizer_or_generation_config_at_the_revision_is_refused(hub, folder):
    """The revision holds files transformers reads beside the weights (another model's tokenizer, its generation
    config) that this push does not bring: they would load with the pushed weights. Not ours to delete: refused
    before anything is committed, in one line naming them and what to do."""
    hub.create_repo("alice/tiny")
    hub.add_files("alice/tiny", {"config.json": b"{}", "tokenizer.json": b"{}", "special_tokens_map.json": b"{}",
                                 "generation_config.json": b"{}", "notes.txt": b"x", "docs/tokenizer.json": b"{}"})
    head = hub.repo("alice/tiny").branches["main"]
    with pytest.raises(PushError) as e:
        push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    message = str(e.value)
    assert e.value.kind == "conflict" and "\n" not in message, message
    assert "generation_config.json, special_tokens_map.json, tokenizer.json" in message, message
    assert "docs/" not in message and "notes.txt" not in message and "nothing was committed" in message
    assert hub.repo("alice/tiny").branches["main"] == head and not hub.requests("POST", r"/commit/")

    # the files this push brings itself are no conflict
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        (folder / name).write_text("{}")
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    assert remote_files(hub, "alice/tiny") == {**expected_files(folder), "notes.txt": b"x",
                                               "docs/tokenizer.json": b"{}"}


def test_a_weights_only_push_over_another_config_is_refused(hub, folder):
    """A --weights-only merge has no config.json: pushed over a revision that holds one, transformers would load the
    pushed weights as that config's model (it may fit their shapes and still be another model). Refused, nothing
    committed; the same push into a revision without a config goes through."""
    (folder / "config.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    hub.create_repo("alice/tiny")
    hub.add_files("alice/tiny", {"config.json": b'{"model_type": "llama"}'})
    head = hub.repo("alice/tiny").branches["main"]
    with pytest.raises(PushError) as e:
        push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    message = str(e.value)
    assert e.value.kind == "conflict" and "\n" not in message and "config.json (another model's config)" in message
    assert hub.repo("alice/tiny").branches["main"] == head and not hub.requests("POST", r"/commit/")
    hub.create_repo("alice/bare")
    push_folder(folder, "alice/bare", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    assert remote_files(hub, "alice/bare") == expected_files(folder)


def test_delete_stale_false_is_refused_where_the_revision_keeps_weights_a_loader_reads(hub, folder, tmp_path):
    """delete_stale=False only adds. Beside the pushed index a model.safetensors (transformers loads it first), beside a
    pushed model.safetensors the old index and shards (vLLM follows the index), or old shards the new index does not
    name (loaders that read every *.safetensors) would load another push's weights: refused, nothing committed."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    single = single_file_folder(tmp_path / "single")
    push_folder(folder, "alice/tiny", **opts)
    push_folder(folder, "alice/tiny", delete_stale=False, **opts)  # nothing of an earlier push beside it: fine
    head = hub.repo("alice/tiny").branches["main"]
    with pytest.raises(PushError) as e:
        push_folder(single, "alice/tiny", delete_stale=False, **opts)
    assert e.value.kind == "conflict" and "\n" not in str(e.value)
    assert "model-00001-of-00004.safetensors" in str(e.value) and "model.safetensors.index.json" in str(e.value)
    assert "delete_stale" in str(e.value)

    push_folder(single, "alice/tiny", revision="single", **opts)
    with pytest.raises(PushError, match=r"model\.safetensors \("):
        push_folder(folder, "alice/tiny", revision="single", delete_stale=False, **opts)

    three = tmp_path / "three"  # the same weights in 3 shards of other names
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for i, name in enumerate(names):
        write_random(three / name, 300_000, seed=30 + i)
    (three / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 900_000}, "weight_map": {f"layers.{i}.weight": n for i, n in enumerate(names)}}))
    (three / "config.json").write_bytes((folder / "config.json").read_bytes())
    (three / "tokenizer_config.json").write_bytes((folder / "tokenizer_config.json").read_bytes())
    with pytest.raises(PushError, match="model-00004-of-00004.safetensors"):
        push_folder(three, "alice/tiny", delete_stale=False, **opts)
    assert hub.repo("alice/tiny").branches["main"] == head


@pytest.mark.parametrize("fails", ["first commit", "second commit", "conflict"])
def test_a_failed_commit_removes_the_branch_the_push_made_and_only_that(hub, folder, fails):
    """A push to a new branch whose commit fails (or is refused) removes the branch it made, with what of the push
    it holds: no half-pushed branch stays. A branch that was there before stays as it was."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=3, retry=FAST)
    hub.create_repo("alice/tiny")
    hub.add_files("alice/tiny", {"notes.txt": b"x", **({"adapter_config.json": b"{}"} if fails == "conflict" else {})})
    hub.repo("alice/tiny").branches["kept"] = hub.repo("alice/tiny").branches["main"]
    before = dict(hub.repo("alice/tiny").branches)
    for revision in ("new", "kept"):
        if fails != "conflict":
            hub.fail_next(r"/commit/", n=20, status=422, skip=1 if fails == "second commit" else 0)
        with pytest.raises(PushError):
            push_folder(folder, "alice/tiny", revision=revision, **opts)
        hub.clear_faults()
        if revision == "new":
            assert hub.repo("alice/tiny").branches == before
    assert hub.repo("alice/tiny").branches["main"] == before["main"]
    assert "new" not in hub.repo("alice/tiny").branches
    if fails == "second commit":  # the branch that was there keeps the commit that landed
        assert hub.repo("alice/tiny").branches["kept"] != before["kept"]
    else:
        assert hub.repo("alice/tiny").branches["kept"] == before["kept"]


def test_existing_repo_is_updated_and_a_rerun_sends_nothing(hub, folder):
    hub.create_repo("alice/tiny")
    hub.add_files("alice/tiny", {"config.json": b'{"old": true}', "notes.txt": b"kept"})
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)

    push_folder(folder, "alice/tiny", **opts)
    assert hub.file_bytes("alice/tiny", "config.json") == (folder / "config.json").read_bytes()
    assert hub.file_bytes("alice/tiny", "notes.txt") == b"kept"  # a push adds, it does not delete
    n_commits, n_log = len(hub.commit_log("alice/tiny")), len(hub.log)

    push_folder(folder, "alice/tiny", **opts)  # same folder again
    again = hub.log[n_log:]
    assert not [e for e in again if e.method == "PUT" or "/commit/" in e.path]
    assert len(hub.commit_log("alice/tiny")) == n_commits

    write_random(folder / "model-00003-of-00004.safetensors", 700_000, seed=1234)  # one shard changes
    n_log = len(hub.log)
    push_folder(folder, "alice/tiny", **opts)
    puts = [e.path for e in hub.log[n_log:] if e.method == "PUT"]
    sha = hashlib.sha256((folder / "model-00003-of-00004.safetensors").read_bytes()).hexdigest()
    assert puts == [f"/_lfs/upload/{sha}"]
    assert hub.commit_log("alice/tiny")[-1].added == ["model-00003-of-00004.safetensors"]
    assert remote_files(hub, "alice/tiny") == {**expected_files(folder), "notes.txt": b"kept"}


def test_branch_is_created_and_main_is_left_alone(hub, folder):
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, revision="step-3", retry=FAST)
    assert remote_files(hub, "alice/tiny", "step-3") == expected_files(folder)
    assert set(hub.files("alice/tiny", "main")) == {".gitattributes"}


def test_resume_after_client_killed_mid_upload_resends_nothing_stored(hub, folder):
    code = f"""
        from streammerge.hub.pusher import push_folder
        push_folder({str(folder)!r}, "alice/tiny", max_workers=1)
    """
    env = {"HF_TOKEN": WRITE_TOKEN, "HF_ENDPOINT": hub.endpoint}
    held = hub.hang(r"^/_lfs/(upload|part)/", method="PUT", skip=3)  # let 3 blob PUTs through, hold the 4th
    proc = run_client(code, env)
    held.kill_when_entered(proc, timeout=30)
    first_run = completed_puts(hub)
    assert sum(first_run.values()) == 3
    assert not hub.requests("POST", r"/commit/")  # killed before anything was committed

    n_log = len(hub.log)
    proc = run_client(code, env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err

    second_run = Counter(e.path for e in hub.log[n_log:] if e.method == "PUT" and e.status == 200)
    assert not set(first_run) & set(second_run)  # nothing the Hub stored was sent again
    assert max(completed_puts(hub).values()) == 1  # no blob (or part) PUT twice
    assert remote_files(hub, "alice/tiny") == expected_files(folder)


def test_transient_errors_and_rate_limits_are_retried(hub, folder):
    hub.reset_next(r"^/api/repos/create$")
    hub.fail_next(r"^/api/repos/create$", status=503)
    hub.fail_next(r"/preupload/", status=500)
    hub.fail_next(r"/info/lfs/objects/batch$", status=502)
    hub.fail_next(r"^/_lfs/(upload|part)/", status=503, method="PUT")
    hub.fail_next(r"/commit/", status=429, retry_after=1)
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)

    assert remote_files(hub, "alice/tiny") == expected_files(folder)
    assert len(hub.commit_log("alice/tiny")) == 2
    assert [e.status for e in hub.requests("POST", r"^/api/repos/create$")] == [None, 503, 200]
    attempts = hub.requests("POST", r"/commit/")
    assert [e.status for e in attempts] == [429, 200]
    assert attempts[1].t_start - attempts[0].t_end >= 1.0  # Retry-After honoured
    assert max(completed_puts(hub).values()) == 1


def test_lost_commit_answer_does_not_commit_twice(hub, folder):
    hub.drop_after_commit()
    info = push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)

    commits = hub.commit_log("alice/tiny")
    assert len(commits) == 2 and info.oid == commits[-1].oid
    assert [e.status for e in hub.requests("POST", r"/commit/")] == [None]  # applied once, answer lost
    assert remote_files(hub, "alice/tiny") == expected_files(folder)


def test_failed_commit_is_sent_again_on_top_of_the_head_it_checked(hub, folder):
    hub.fail_next(r"/commit/", status=500)
    hub.reset_next(r"/commit/")  # then a connection reset before the server applied it
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    assert [e.status for e in hub.requests("POST", r"/commit/")] == [500, None, 200]
    assert len(hub.commit_log("alice/tiny")) == 2
    assert remote_files(hub, "alice/tiny") == expected_files(folder)


def test_retried_commit_never_lands_on_a_head_it_did_not_check(hub, folder):
    hub.fail_next(r"/commit/", status=503)
    # Between our look at the head and the retried commit, someone else commits (as a lost attempt
    # landing late would): the Hub refuses ours (412), we look again and commit on the new head.
    hub.before_next(r"/commit/", lambda: hub.add_files("alice/tiny", {"other.txt": b"x"}, "rival"))
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    assert [e.status for e in hub.requests("POST", r"/commit/")] == [503, 412, 200]
    assert [c.summary for c in hub.commit_log("alice/tiny")][1:] == ["rival", "Upload model with streammerge"]
    assert remote_files(hub, "alice/tiny") == {**expected_files(folder), "other.txt": b"x"}


def test_bad_token_gives_login_advice_and_never_shows_the_token(hub, folder):
    bad = "hf_ThisIsNotAValidTokenButLooksLikeOne42"
    before = tree_digest(folder)
    with pytest.raises(PushError) as exc_info:
        push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=bad, retry=FAST)
    assert exc_info.value.kind == "auth"
    assert "hf auth login" in str(exc_info.value) and "HF_TOKEN" in str(exc_info.value)

    # What a user sees, traceback and logs included, when the token comes from HF_TOKEN.
    proc = run_client(f"""
        import logging; logging.basicConfig(level=logging.DEBUG)
        from streammerge.hub.pusher import push_folder
        push_folder({str(folder)!r}, "alice/tiny")
    """, {"HF_TOKEN": bad, "HF_ENDPOINT": hub.endpoint})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "PushError" in err and "hf auth login" in err and "the token in HF_TOKEN" in err
    assert bad not in out + err
    assert tree_digest(folder) == before  # a failed push leaves the folder alone
    assert ("model", "alice/tiny") not in hub.repos


def test_read_only_token_and_foreign_org_get_permission_advice(hub, folder):
    before = tree_digest(folder)
    with pytest.raises(PushError) as exc_info:
        push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=READ_TOKEN, retry=FAST)
    assert exc_info.value.kind == "permission" and "write access" in str(exc_info.value)
    assert READ_TOKEN not in str(exc_info.value)

    # A merge feeding the pusher learns it at its next submit, not after writing every shard.
    pusher = HubPusher("alice/tiny", endpoint=hub.endpoint, token=READ_TOKEN, retry=FAST)
    pusher.submit(folder / "config.json").result(timeout=30)
    with pytest.raises(PushError, match="write access"):
        pusher.submit(folder / "tokenizer_config.json")
    pusher.close()

    hub.create_repo("acme/tiny")  # exists, but bob is not in acme
    with pytest.raises(PushError) as exc_info:
        push_folder(folder, "tiny", organization="acme", endpoint=hub.endpoint, token=OTHER_TOKEN, retry=FAST)
    assert exc_info.value.kind == "permission" and "member" in str(exc_info.value)
    assert len(hub.commit_log("acme/tiny")) == 1
    assert tree_digest(folder) == before


def test_xet_on_against_a_hub_without_xet_says_how_to_turn_it_off(hub, folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(PushError) as exc_info:
        push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    assert exc_info.value.kind == "xet"
    assert "HF_HUB_DISABLE_XET=1" in str(exc_info.value)
    assert WRITE_TOKEN not in str(exc_info.value)


def test_uploads_start_while_the_next_file_is_still_being_produced(hub, tmp_path):
    # The producer waits for each shard's upload before it writes the next one, so the test does
    # not depend on how fast a loaded machine uploads; a pusher that only uploads in finish() never
    # completes one and the wait fails.
    out = tmp_path / "growing"
    produced: dict[str, float] = {}
    with HubPusher("alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST) as pusher:
        for i, (name, size) in enumerate(SHARDS.items()):
            write_random(out / name, size, seed=i)
            produced[name] = time.monotonic()
            pusher.submit(out / name, name, size=size).result(timeout=60)
        (out / "config.json").write_text("{}")
        pusher.submit(out / "config.json")
        finish_called = time.monotonic()
        pusher.finish()

    first_shard = hashlib.sha256((out / "model-00001-of-00004.safetensors").read_bytes()).hexdigest()
    done = [e for e in hub.requests("POST", rf"^/_lfs/complete/{first_shard}$") if e.status == 200]
    assert done and done[0].t_end < produced["model-00002-of-00004.safetensors"]
    assert len([e for e in hub.requests("PUT") if e.t_end < finish_called]) >= 4
    assert not [e for e in hub.requests("POST", r"/commit/") if e.t_start < finish_called]
    assert remote_files(hub, "alice/tiny") == {**expected_files(out)}


def test_submit_checks_the_announced_size_and_uses_a_known_sha256(hub, tmp_path):
    f = tmp_path / "model.safetensors"
    write_random(f, 200_000, seed=5)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    with HubPusher("alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST) as pusher:
        with pytest.raises(ValueError, match="is it finished"):
            pusher.submit(f, size=100)
        pusher.submit(f, sha256=digest, size=200_000)
    assert hub.files("alice/tiny")["model.safetensors"].sha256 == digest


def test_model_card_describes_the_merge_and_goes_in_the_last_commit(hub, folder):
    info = {"repo_id": "alice/tiny", "source": "/ckpt/global_step_3/actor", "step": 3, "world_size": 4,
            "dtype": "bfloat16", "optimizer": True, "base_model": "meta-llama/Llama-3.2-1B"}
    text = make_model_card(info)
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and "streammerge" in card.data.tags
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    for fact in ("/ckpt/global_step_3/actor", "| `4` |", "bfloat16", 'from_pretrained("alice/tiny"',
                 "load_optimizer_state_dict"):
        assert fact in text
    assert "load_optimizer_state_dict" not in make_model_card({**info, "optimizer": False})

    (folder / "README.md").write_text(text)
    push_folder(folder, "alice/tiny", endpoint=hub.endpoint, token=WRITE_TOKEN, max_files_per_commit=4,
                retry=FAST)
    assert set(hub.commit_log("alice/tiny")[-1].added) == LAST | {"README.md"}
    assert hub.file_bytes("alice/tiny", "README.md").decode() == text


def test_any_single_byte_edit_of_a_generated_card_is_no_longer_recognised_as_untouched():
    card = make_model_card({"repo_id": "alice/tiny", "source": "global_step_3/actor", "step": 3, "dtype": "bfloat16",
                            "model_class": "Qwen2ForTokenClassification"}).encode()
    assert card_state(card) == "untouched" and is_untouched_card(card)
    assert card.endswith(b" -->\n") and b"\n\n<!-- streammerge card sha256:" in card
    assert "<!--" not in ModelCard(card.decode()).data.to_yaml()  # the metadata the Hub reads is unchanged
    n = 0
    for i in range(len(card) + 1):
        edits = [card[:i] + bytes([b]) + card[i:] for b in range(256)]  # a byte inserted before byte i
        if i < len(card):  # byte i deleted, or replaced by any other value
            edits += [card[:i] + card[i + 1:]] + [card[:i] + bytes([b]) + card[i + 1:] for b in range(256)
                                                   if b != card[i]]
        for edited in edits:
            assert not is_untouched_card(edited), (i, edited[max(0, i - 20):i + 20])
            n += 1
    assert n > 500 * len(card)
    # Still ours by its tag, once edited: kept, with a warning. Anything else is someone else's.
    assert card_state(card.replace(b"| `3` |", b"| `4` |")) == "edited"
    assert card_state(card.replace(b"<!-- streammerge card", b"<!-- card")) == "edited"
    assert card_state(b"---\ntags: streammerge\n---\n# an old card\n") == "edited"
    for other in (b"", b"# My model\n", b"---\ntags: [rl]\n---\nstreammerge\n", b"---\ntags: [a\n---\n",
                  b"\xff\xfe---", card.replace(b"- streammerge\n", b"- mine\n")):
        assert card_state(other) == "other", other


def test_plan_commits_orders_and_splits():
    paths = ["b.safetensors", "config.json", "a.safetensors", "model.safetensors.index.json", "c.safetensors"]
    assert plan_commits(paths, 10) == [["a.safetensors", "b.safetensors", "c.safetensors", "config.json",
                                        "model.safetensors.index.json"]]
    assert plan_commits(paths, 2) == [["a.safetensors", "b.safetensors"], ["c.safetensors"],
                                      ["config.json", "model.safetensors.index.json"]]
    assert plan_commits([], 2) == []


def test_delete_patterns_remove_stale_files_only_and_list_them_at_the_head_committed_on(hub, folder):
    owned = ("model-*-of-*.safetensors", "optimizer/")
    assert matches("optimizer/a/b.pt", "optimizer/") and matches("model-1-of-2.safetensors", owned[0])
    assert not matches("extra/model-1-of-2.safetensors", owned[0]) and not matches("optimizer.pt", "optimizer/")
    assert matches("x/y/z.json", "**.json") and not matches("x/y.json", "*.json") and matches("a.bin", "?.bin")

    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    push_folder(folder, "alice/tiny", **opts)
    hub.add_files("alice/tiny", {"notes.txt": b"kept", "extra/model-00001-of-00002.safetensors": b"kept too"})
    (folder / "model-00004-of-00004.safetensors").unlink()  # this push has one shard fewer; the rest is unchanged
    n_log = len(hub.log)
    info = push_folder(folder, "alice/tiny", delete_patterns=owned, **opts)
    last = hub.commit_log("alice/tiny")[-1]
    assert info.oid == last.oid and last.added == [] and last.deleted == ["model-00004-of-00004.safetensors"]
    assert not [e for e in hub.log[n_log:] if e.method == "PUT"]
    assert remote_files(hub, "alice/tiny") == {**expected_files(folder), "notes.txt": b"kept",
                                               "extra/model-00001-of-00002.safetensors": b"kept too"}
    assert ".gitattributes" in hub.files("alice/tiny")

    # A file of ours that appears after the files were listed (a rival push) makes the commit fail
    # (412: its parent is no longer the head); the retry lists again and deletes that one too.
    hub.before_next(r"/commit/", lambda: hub.add_files("alice/tiny", {"optimizer/old.pt": b"x"}, "rival"))
    (folder / "model-00003-of-00004.safetensors").unlink()
    push_folder(folder, "alice/tiny", delete_patterns=owned, **opts)
    assert [e.status for e in hub.requests("POST", r"/commit/")][-2:] == [412, 200]
    assert sorted(hub.commit_log("alice/tiny")[-1].deleted) == ["model-00003-of-00004.safetensors", "optimizer/old.pt"]
    assert "notes.txt" in hub.files("alice/tiny") and "optimizer/old.pt" not in hub.files("alice/tiny")



def test_a_folder_pushed_over_an_earlier_model_replaces_its_weights_and_untouched_card(hub, folder, tmp_path):
    """An earlier push of one model.safetensors with a generated card, then this sharded folder: transformers prefers
    model.safetensors to an index, so the old file left beside the new index would load the earlier model."""
    opts = dict(endpoint=hub.endpoint, token=WRITE_TOKEN, retry=FAST)
    earlier = tmp_path / "earlier"
    write_random(earlier / "model.safetensors", 600_000, seed=7)
    (earlier / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (earlier / "README.md").write_text(make_model_card({"repo_id": "alice/tiny", "source": "global_step_1/actor",
                                                        "step": 1, "dtype": "bfloat16"}))
    push_folder(earlier, "alice/tiny", **opts)
    hub.add_files("alice/tiny", {"notes.txt": b"kept"})
    assert {"model.safetensors", "README.md"} <= set(hub.files("alice/tiny"))

    push_folder(folder, "alice/tiny", **opts)
    assert sorted(hub.commit_log("alice/tiny")[-1].deleted) == ["README.md", "model.safetensors"]
    assert remote_files(hub, "alice/tiny") == {**expected_files(folder), "notes.txt": b"kept"}

    # a folder without weights (a tokenizer update) deletes nothing; delete_stale=False, which would keep the index and
    # shards beside model.safetensors (and the other push's tokenizer), is refused
    extra = tmp_path / "tokenizer"
    (extra / "tokenizer_config.json").parent.mkdir()
    (extra / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    push_folder(extra, "alice/tiny", **opts)
    assert hub.commit_log("alice/tiny")[-1].deleted == []
    head = hub.repo("alice/tiny").branches["main"]
    with pytest.raises(PushError, match="delete_stale=True"):
        push_folder(earlier, "alice/tiny", delete_stale=False, **opts)
    assert hub.repo("alice/tiny").branches["main"] == head

# Every kind of token, against a personal and an organization namespace: (token, repo, refusal or None).
ACCESS_CASES = [
    (WRITE_TOKEN, "alice/m", None),  # classic write token: own namespace ...
    (WRITE_TOKEN, "acme/m", None),  # ... and an org where alice has the write role
    (READ_TOKEN, "alice/m", "token of user alice cannot write to alice/m (read-only token)"),
    (OTHER_TOKEN, "acme/m", "token of user bob cannot write to acme (bob is not a member of acme)"),
    (ORG_READER_TOKEN, "acme/m", "token of user carol cannot write to organization acme (carol has the read-only "
                                 "'read' role in acme)"),
    (ORG_READER_TOKEN, "carol/m", None),
    (FINE_TOKEN, "acme/m", None),  # fine-grained, repo.write on acme
    (FINE_TOKEN, "alice/m", "token of user alice cannot write to alice/m (fine-grained token without repo.write "
                            "on alice)"),
]


@pytest.mark.parametrize("token,repo_id,refusal", ACCESS_CASES, ids=[
    "write-own", "write-org", "read", "not-member", "org-read-role", "org-reader-own", "fine-org", "fine-own"])
def test_access_check_reads_whoami_as_the_hub_enforces_it(hub, token, repo_id, refusal):
    """The check before the merge agrees with what the Hub then allows: each refusal is one line
    naming the user, the namespace and the reason, and the Hub refuses that token there too."""
    pusher = HubPusher(repo_id, endpoint=hub.endpoint, token=token, retry=FAST)
    api = HfApi(endpoint=hub.endpoint, token=token)
    if refusal is None:
        assert pusher.check_access() == repo_id
        api.create_repo(repo_id)
        assert ("model", repo_id) in hub.repos
        return
    with pytest.raises(PushError) as exc_info:
        pusher.check_access()
    message = str(exc_info.value)
    assert exc_info.value.kind == "permission" and message.startswith(refusal), message
    assert "\n" not in message and token not in message and "write access" in message
    assert not hub.requests("POST", r"^/api/repos/create$")  # checked without creating anything
    with pytest.raises(HfHubHTTPError) as denied:
        api.create_repo(repo_id)
    assert denied.value.response.status_code == 403


def test_fine_grained_token_pushes_to_the_org_it_is_scoped_to(hub, folder):
    push_folder(folder, "tiny", organization="acme", endpoint=hub.endpoint, token=FINE_TOKEN, retry=FAST)
    assert remote_files(hub, "acme/tiny") == expected_files(folder)


def test_repo_name_for_a_folder_is_a_valid_hub_name(tmp_path):
    from huggingface_hub.utils import validate_repo_id

    from streammerge.hub.repo import repo_name_for

    for folder, name in [("my-model", "my-model"), ("My Model (v2)", "My-Model-v2"), ("qwen2.5_7b", "qwen2.5_7b"),
                         ("..run--12..", "run-12"), ("a" * 120, "a" * 96), ("modèle", "mod-le"),
                         ("checkpoint.git", "checkpoint")]:
        assert repo_name_for(tmp_path / folder) == name, folder
        validate_repo_id(f"alice/{name}")
    assert repo_name_for(Path("out/")) == "out"  # the folder's own name, even with a trailing slash
    with pytest.raises(ValueError, match="--repo-id"):
        repo_name_for(tmp_path / "%%%")


def test_a_base_model_names_a_hub_model_or_nothing(tmp_path):
    """What the card's base_model may say (the Hub refuses a path there): a Hub id as given, the repo of a Hub cache
    snapshot (also of the training machine, also a Windows path), never a folder here or elsewhere."""
    from huggingface_hub.utils import validate_repo_id

    from streammerge.model_folder import hub_id

    local = tmp_path / "Qwen2.5-0.5B"
    local.mkdir()
    for name, want in [("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B"), ("gpt2", "gpt2"),
                       ("/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-7B/snapshots/abc123", "Qwen/Qwen2.5-7B"),
                       ("hub/models--gpt2/snapshots/abc/", "gpt2"),
                       ("C:\\Users\\me\\hub\\models--acme--m\\snapshots\\r1", "acme/m"),
                       ("/mnt/train/models/Qwen2.5", None), ("./Qwen2.5", None), ("~/models/q", None),
                       (str(local), None), ("a--b/c", None), ("a/b/c", None),
                       ("~alice/models/q", None), ("x" * 300, None), ("acme/m\n", None), ("acme/m.git", None),
                       ("acme/m-", None), ("acme/.m", None), ("modèle/x", None), ("a" * 97, None),
                       ("/x/models--acme--m.git/snapshots/r", None), ("", None), (None, None)]:
        assert hub_id(name) == want, name
        if want:
            validate_repo_id(want)


def test_a_name_from_the_training_machine_is_refused_in_one_line(tmp_path):
    """A `~user` path whose user has no home here, or a name the Hub takes as no id, is neither fetched nor a crash
    in pathlib: --model-name, --base-model and the checkpoint folder each get a one-line error that names it."""
    from streammerge.errors import ConfigError
    from streammerge.model_folder import model_dir_for
    from streammerge.sources.hf import resolve_base

    for name in ("~nosuchuser-sm/models/q", "a--b/c", "acme/m.git", "./missing"):
        with pytest.raises(ConfigError, match="no such folder") as e:
            model_dir_for(name)
        assert repr(name) in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ConfigError, match="--base-model") as e:
            resolve_base(name)
    r = subprocess.run([sys.executable, "-m", "streammerge", "~nosuchuser-sm/ckpt", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "~nosuchuser-sm/ckpt" in r.stderr, r.stderr
    assert "internal error" not in r.stderr
