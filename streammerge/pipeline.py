"""The pipeline in one place: discover -> load -> plan -> write -> (publish). The CLI calls this."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .discover import Checkpoint, find_checkpoint
from .dtypes import DType
from .errors import OutputError
from .manifest import STATE_DIR, Manifest
from .model_folder import carried_files, config_bytes, read_config
from .plan import MAX_SHARD_SIZE, Plan, build_plan, parse_size, resolve_dtype
from .rankset import load_ranks
from .write import (
    DEFAULT_BUFFER_SIZE,
    TMP_SUFFIX,
    FileWriter,
    OutputFile,
    output_error,
    tmp_path,
)

if TYPE_CHECKING:
    import torch  # a torch.dtype is accepted as `dtype` (read by name; torch is not imported for it)

FileCallback = Callable[[OutputFile, Path], None]


@dataclass
class MergeResult:
    out_dir: Path
    files: list[OutputFile]
    plans: list[Plan]
    bytes_written: int  # bytes written by this run (resumed files excluded)
    bytes_total: int
    seconds: float
    peak_rss: int  # bytes, this process (and its children)
    reused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        from .plan import _fmt_bytes

        mbps = self.bytes_written / 1e6 / self.seconds if self.seconds > 0 else 0.0
        reused = f", {len(self.reused)} files reused from an earlier run" if self.reused else ""
        return (f"wrote {_fmt_bytes(self.bytes_written)} in {len(self.files)} files to {self.out_dir} "
                f"in {self.seconds:.2f} s ({mbps:.0f} MB/s), peak RSS {self.peak_rss / 2**20:.0f} MiB{reused}")


def peak_rss() -> int:
    """Peak resident set size of this process and its finished children, in bytes."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return max(own, kids) * scale


def plan(checkpoint_dir: str | Path | Checkpoint, *, dtype: str | DType | torch.dtype | None = "auto",
         max_shard_size: int | str = MAX_SHARD_SIZE, trust_pickle: bool = False) -> Plan:
    """Plan a merge without writing anything (reads metadata only)."""
    ck = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else find_checkpoint(checkpoint_dir)
    config = read_config(ck.hf_dir)
    with gc_paused():  # millions of small records, no cycles: the cyclic GC would rescan them over and over
        ranks = load_ranks(ck.model_files, ck.world_size, trust_pickle=trust_pickle)
        return build_plan(ck, ranks, dtype=resolve_dtype(dtype, config),
                          max_shard_size=parse_size(max_shard_size), hf_config=config)


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_out_dir(out_dir: Path, ck: Checkpoint, fingerprint: str) -> dict | None:
    """Refuse folders we could damage; return the manifest of a previous run of this same merge."""
    src = ck.path.resolve()
    if out_dir == src or src in out_dir.parents:
        raise OutputError(f"{out_dir}: the output folder is inside the checkpoint {src}; choose a folder outside it")
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    previous = Manifest.read(out_dir)
    if previous is None:
        # a run killed before its first manifest leaves only our state folder and temp files
        if any(p.name != STATE_DIR and not p.name.endswith(TMP_SUFFIX) for p in out_dir.iterdir()):
            raise OutputError(f"{out_dir}: folder is not empty and is not a streammerge output; "
                              "choose an empty or new folder (nothing was changed)")
        return None
    if previous.get("fingerprint") != fingerprint:
        raise OutputError(f"{out_dir}: holds a different merge (other checkpoint or options); "
                          "choose a new folder, or delete this one to start over")
    return previous


def merge(checkpoint_dir: str | Path | Checkpoint, out_dir: str | Path, *, dtype: str | DType | torch.dtype | None = "auto",
          max_shard_size: int | str = MAX_SHARD_SIZE, workers: int | None = None,
          buffer_size: int | str = DEFAULT_BUFFER_SIZE, optimizer: bool = True, trust_pickle: bool = False,
          drop_cache: bool = True, progress: bool = False, on_file_done: FileCallback | None = None,
          num_parts: int = 1, part: int = 0, optimizer_format: str = "safetensors",
          sync: Callable[[], None] | None = None) -> MergeResult:
    """Merge an FSDP checkpoint into a Hugging Face folder, streaming in bounded memory.

    Re-running after an interruption reuses the files already finished. `on_file_done` is called
    for each finished file (e.g. to start uploading it while the next one is written).
    `num_parts`/`part` write only this worker's share of the files (torchrun); part 0 also writes
    the small files and the index. `sync` is a barrier across the parts (see distributed.py):
    called twice by every part, after part 0 set up the folder and before part 0 writes the index.
    """
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    ck = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else find_checkpoint(checkpoint_dir)
    config = read_config(ck.hf_dir)
    out_dtype = resolve_dtype(dtype, config)
    weights = plan(ck, dtype=out_dtype if out_dtype is not None else "keep", max_shard_size=max_shard_size,
                   trust_pickle=trust_pickle)
    plans = [weights]
    warnings: list[str] = []
    if optimizer and ck.optim_files:
        from .optimizer import plan_optimizer  # optional stage: only when optimizer files exist

        opt_plan, opt_warnings = plan_optimizer(ck, weights, max_shard_size=parse_size(max_shard_size),
                                                trust_pickle=trust_pickle, fmt=optimizer_format)
        warnings += opt_warnings
        if opt_plan is not None:
            plans.append(opt_plan)
    elif optimizer and ck.missing_optim_ranks:
        warnings.append(f"optimizer not exported: optim rank files missing for ranks {list(ck.missing_optim_ranks)}")

    options = {"dtype": str(out_dtype), "max_shard_size": parse_size(max_shard_size), "optimizer": len(plans) > 1}
    fingerprint = merge_fingerprint(plans, options)
    if sync is not None and part != 0:
        sync()  # part 0 checks and sets up the folder first
    previous = _check_out_dir(out, ck, fingerprint)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    manifest = Manifest(out, fingerprint, str(ck.path), options, part=part)
    manifest.adopt(previous)
    ours = [f"{p.subdir}/{fp.filename}" if p.subdir else fp.filename for p in plans for fp in p.split(num_parts, part)]
    finished = {rel: manifest.finished(out, rel) for rel in ours}
    if part == 0 and None in finished.values():  # an index means "complete": drop it until every file is back
        for p in plans:
            rel = f"{p.subdir}/{p.index_filename}" if p.subdir else p.index_filename
            if p.index_filename and manifest.data["files"].pop(rel, None) is not None:
                (out / rel).unlink(missing_ok=True)
    manifest.save()
    if part == 0:
        ours += [rel for rel, _ in _small_files(ck, plans, out_dtype, config, contents=False)]
    _remove_temp_files(out, ours, own_manifest=part == 0)  # left by a killed run
    if sync is not None and part == 0:
        sync()

    files: list[OutputFile] = []
    reused: list[str] = []
    written = 0
    total = sum(f.size for p in plans for f in p.split(num_parts, part))
    bar = _progress_bar(total, progress)

    def done(f: OutputFile) -> None:
        files.append(f)
        if on_file_done is not None:
            on_file_done(f, out / f.filename)

    try:
        with FileWriter(workers=workers or default_workers(), buffer_size=parse_size(buffer_size),
                        drop_cache=drop_cache, progress=bar.update if bar else None) as writer:
            for p in plans:
                for fp in p.split(num_parts, part):
                    rel = f"{p.subdir}/{fp.filename}" if p.subdir else fp.filename
                    prior = finished[rel]
                    if prior is not None:
                        reused.append(rel)
                        if bar:
                            bar.update(prior.size)
                        done(prior)
                        continue
                    if fp.filename.endswith(".pt"):  # --optimizer-format torch
                        from .torch_format import write_torch_file

                        f = write_torch_file(p, fp, out / rel, writer)
                    else:
                        f = writer.write(p, fp, out / rel)
                    written += f.size
                    manifest.add(f)
                    done(f)
        if sync is not None:
            sync()  # every part has written its files
        if part == 0:
            manifest.gather_parts()
            smalls = list(_small_files(ck, plans, out_dtype, config))
            indexes = {f"{p.subdir}/{p.index_filename}" if p.subdir else p.index_filename
                       for p in plans if p.index_filename}
            for rel, data in smalls:
                if rel not in indexes:
                    f = _write_small(out, rel, data)
                    manifest.add(f)
                    done(f)
            # an index says "complete": it appears only once the manifest says so
            staged = [_write_small(out, rel, data, rename=False) for rel, data in smalls if rel in indexes]
            for f in staged:
                manifest.add(f)
            manifest.complete()
            for f in staged:
                os.replace(tmp_path(out / f.filename), out / f.filename)
                done(f)
    except BaseException:  # Ctrl-C, a full disk...: leave finished files and the manifest, no temp files
        _remove_temp_files(out, ours, own_manifest=part == 0)
        raise
    finally:
        if bar:
            bar.close()
    return MergeResult(out, files, plans, written, sum(f.size for f in files), time.perf_counter() - t0,
                       peak_rss(), reused, warnings)


def _small_files(ck: Checkpoint, plans: list[Plan], dtype: DType | None, config: dict | None,
                 contents: bool = True):
    """Config, tokenizer and other carried files, then the indexes: the index is always written last."""
    import json

    if ck.hf_dir is not None:
        for src in carried_files(ck.hf_dir):
            rel = src.relative_to(ck.hf_dir).as_posix()
            if not contents:
                yield rel, b""
            elif rel == "config.json" and config is not None:
                yield rel, config_bytes(config, dtype)
            else:
                yield rel, src.read_bytes()
    for p in plans:
        if p.index_filename:
            rel = f"{p.subdir}/{p.index_filename}" if p.subdir else p.index_filename
            yield rel, (json.dumps(p.index_json(), indent=2) + "\n").encode() if contents else b""


def merge_fingerprint(plans: Sequence[Plan], options: dict) -> str:
    """Identifies a merge (plans and options): a resumed run must match it, and verify checks it."""
    return hashlib.sha256("".join(p.fingerprint() for p in plans).encode() + repr(options).encode()).hexdigest()


def _remove_temp_files(out: Path, rels: Sequence[str], own_manifest: bool = True) -> None:
    """Remove the temp files this run may have left (only our own names; never a user's file)."""
    for rel in rels:
        tmp_path(out / rel).unlink(missing_ok=True)
    if own_manifest:  # torchrun ranks > 0 keep their own part manifests; manifest.tmp is rank 0's
        (out / STATE_DIR / "manifest.tmp").unlink(missing_ok=True)


def _write_small(out: Path, rel: str, data: bytes, rename: bool = True) -> OutputFile:
    path = out / rel
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if rename:
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(e, path) from None
    return OutputFile(rel, len(data), hashlib.sha256(data).hexdigest())


def default_workers() -> int:
    """Threads mostly wait on the disk (reads, writes) and release the GIL when they copy or cast:
    more in flight than cores keeps the disk busy (measured: 8 beat 2 and 4 on 2 cores)."""
    return max(4, min(16, 4 * (os.cpu_count() or 1)))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merge", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


__all__ = ["MergeResult", "merge", "plan", "STATE_DIR"]
