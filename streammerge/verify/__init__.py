"""Verify: prove an output folder is complete and correct, reading everything in bounded chunks.

Without the checkpoint: every safetensors file opens with the Rust reader and its tensors tile the
data exactly, every file's checksum matches the manifest, and each index names exactly the tensors its
files hold. With the checkpoint: the merge is planned again from metadata and every output tensor is
compared with its source pieces, bit for bit (or with their cast, when a dtype was chosen); the zip
CRC32 of each source record is checked too, because torch.load never checks them. Tensors are
compared by a pool of threads while other threads stream the rank files once for their CRCs (which
also brings them into the page cache for the comparison); a safetensors file compared tensor by
tensor is not checksummed again, so each folder is read about once. Where the page cache cannot hold
the rank files, the streams' pages would be evicted before the comparison reads them: there the CRCs
are computed from the bytes the comparison reads, and the kernel is asked to read a bounded distance
ahead of it instead.

Nothing is fixed here and nothing is written: verify reports, the merge command repairs (rerun it).

`verify()` below runs the steps, one module each:

    loading.py      what transformers loads from the folder: the tensors config.json describes (asked first: a
                    child importing transformers answers while the rest reads)
    folder.py       the folder on its own: manifest and checksums, leftovers, safetensors headers, indexes, files
                    no merge wrote; given the plan, the header bytes and pickles tensor comparisons do not see
    flags.py        the options the merge is planned again with: the manifest's, else what the folder shows;
                    verify's own flags held to them
    reading.py      started before the folder's other checks, so the disk is busy at once: the plan, torch's own
                    reader (the oracle), the rank files' CRC streams or the readahead
    compare.py      every tensor against the checkpoint, window by window, and the rank files' zip CRC32s
    small_files.py  config.json, generation_config.json, the tokenizer, indexes, an adapter's config and an
                    optimizer export's param groups against what the merge writes from the checkpoint
    report.py       VerifyReport, which every step adds its failures and notes to

Importing this package imports no torch: the steps that need it import it when they run.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..checksum import FELL_BACK as CRC_FELL_BACK
from ..errors import CheckpointError, StreammergeError
from ..options import CHECKSUMS, LORA_MODES, MergeOptions, parse_size
from ..paths import user_path
from ..sources import Source, model_folder, open_checkpoint
from .compare import check_against_checkpoint
from .flags import recorded_options
from .folder import check_indexes, check_manifest, check_safetensors, check_temp_files, check_unlisted_files
from .loading import check_architecture, loaded_map, note_rounded_float32, start_architecture, weight_shapes
from .reading import start_reading
from .report import VerifyReport

__all__ = ["VerifyReport", "recorded_options", "verify"]

DEFAULT_CHUNK = 4 * 2**20


def _open_given_checkpoint(checkpoint_dir: str | Path, out: Path) -> Source:
    """The checkpoint verify compares with; where it is not one but OUT is, the two were given the wrong way round."""
    try:
        return open_checkpoint(checkpoint_dir)
    except CheckpointError as e:
        given = user_path(checkpoint_dir).resolve()
        try:
            open_checkpoint(out)
        except StreammergeError:
            if given.is_dir() and model_folder(given):
                raise CheckpointError(f"{given}: a Hugging Face model folder, not the checkpoint {out} was merged "
                                      "from: give that checkpoint, or leave it out to check the folder against its "
                                      "manifest") from None
            raise e from None
        raise CheckpointError(f"{given} is not a checkpoint and {out} is one: the two are given the wrong way round; "
                              "the merged folder comes first (streammerge verify OUT_DIR CKPT_DIR)") from None


def verify(out_dir: str | Path, checkpoint_dir: str | Path | None = None, *, trust_pickle: bool = False,
           chunk_size: int | str = DEFAULT_CHUNK, workers: int | None = None,
           checksums: str = "auto", lora: str | None = None, lora_rank: int | None = None,
           lora_alpha: float | None = None, lora_rslora: bool | None = None,
           base_model: str | None = None, model_name: str | None = None,
           key_prefix: str | None = None) -> VerifyReport:
    """Check an output folder; given the checkpoint, check every tensor against its source pieces.

    Problems with the output are collected in the report (never raised); a checkpoint that cannot
    be read raises CheckpointError as the merge would. ``checksums`` says where veRL rank files' zip
    CRC-32s come from: ``"streams"`` read each file front to back beside the comparison (and bring it
    into the page cache for it), ``"compare"`` computes them from what the comparison reads, streaming
    only the records it did not read in order (for machines whose page cache cannot hold the rank
    files, where streams would have them read from disk twice); ``"auto"`` picks by the memory free.
    Other formats check their checksums after the comparison either way.

    ``lora``, ``lora_rank``, ``lora_alpha``, ``lora_rslora``, ``base_model``: a LoRA checkpoint's merge mode, the
    settings its files do not record and an adapter-only checkpoint's base weights, as the merge took them
    (``--lora adapter``, ``--lora-rank``, ``--base-model`` ...). A folder with a manifest
    is checked with those it records (one given that differs is a failure); one without is checked with these (a
    folder cannot tell whether its weights are the fold or the base as saved: without ``lora``, ``both``).
    ``model_name`` and ``key_prefix`` likewise: the config a merge took (a Megatron checkpoint's names come from it)
    and the DCP container it took the model from.
    """
    if checksums not in CHECKSUMS:
        raise ValueError(f"checksums must be one of {', '.join(CHECKSUMS)}, not {checksums!r}")
    if lora is not None and lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {', '.join(LORA_MODES)}, not {lora!r}")
    out = user_path(out_dir).resolve()
    report = VerifyReport(out, user_path(checkpoint_dir).resolve() if checkpoint_dir else None)
    if not out.is_dir():
        report.fail(f"{out}: not a folder")
        return report
    chunk = max(4096, parse_size(chunk_size))
    workers = workers or _default_workers()
    arch = start_architecture(out, report)  # first: a child importing transformers answers while the rest reads
    reading = None
    try:
        ck = _open_given_checkpoint(checkpoint_dir, out) if checkpoint_dir is not None else None
        # with the checkpoint, every tensor of a safetensors file is compared with its source: no checksum pass
        manifest = check_manifest(out, report,
                                  checksum=lambda rel: checkpoint_dir is None or not rel.endswith(".safetensors"),
                                  against_checkpoint=ck is not None)
        if ck is not None:
            from ..pipeline import absolute_folders, import_behind

            folders = absolute_folders(MergeOptions.create(base_model=base_model, model_name=model_name,
                                                           key_prefix=key_prefix))
            given = {"lora": lora, "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_rslora": lora_rslora,
                     "base_model": folders.base_model, "model_name": folders.model_name, "key_prefix": key_prefix}
            reading = start_reading(out, ck, manifest, report, trust_pickle=trust_pickle, workers=workers,
                                    checksums=checksums, lora={k: v for k, v in given.items() if v is not None},
                                    then=functools.partial(import_behind, *ck.oracle_modules))
        if ck is None and manifest is not None:
            check_unlisted_files(out, manifest, report)
        check_temp_files(out, report)
        headers = check_safetensors(out, report)
        weight_maps = check_indexes(out, headers, report)
        shapes = None
        if arch is not None:
            shapes = weight_shapes(out, headers, weight_maps, report)
            if shapes is None:
                arch.close()
                arch = None
            else:
                arch.ready(sorted(shapes))  # the child places the names while the tensors are compared
        if ck is not None and reading is not None:
            report.checkpoint = ck.path
            check_against_checkpoint(out, ck, reading, headers, report, chunk=chunk, workers=workers,
                                     weight_maps=weight_maps)
        if arch is not None and shapes is not None:
            check_architecture(arch, shapes, report)
            note_rounded_float32(arch, loaded_map(out, headers, weight_maps) or {}, headers, report)
    finally:
        if reading is not None:
            reading.close()
        if arch is not None:
            arch.close()
    if CRC_FELL_BACK:  # the manifest's checksums and the rank files' zip CRCs alike
        report.notes.append(f"CRC-32s: {CRC_FELL_BACK}")
    return report


def _default_workers() -> int:
    """Comparing is CPU work (torch's cast, numpy's compare, CRC-32): a thread per CPU, at most 8."""
    from ..pipeline import cpu_count

    return min(8, cpu_count())
