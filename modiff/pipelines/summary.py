"""Run summaries: a finished run in a small folder that stands in for it wherever the notebooks read runs.

A paper-scale run holds 10,000 PNGs; what the notebooks read from it is much smaller:

    SUMMARY/manifest.json  the run's manifest (identity, seeds, sessions: read as a run's is, so
                           `finished_run` reuses the summary and Table 1 shows its arithmetic), plus
                           ``summary``: what it was made from, with which settings (the classifier's
                           weights among them), against which fp run (its identity, a fingerprint of its images)
    SUMMARY/metrics.json   FID, IS, KID and precision/recall (classifier space) with their bootstrap
                           intervals, and the FID, KID, precision and recall of every bootstrap resample
                           ({name}_resamples: Table 1's paired verdicts), over the summarized seeds
    SUMMARY/per_seed.npz   per seed: relative L2 and PSNR of the image to the full-precision run's image of
                           the same seed (Table 1's fidelity columns, the sampler tables)
    SUMMARY/images.npz     the images of the first seeds (128 by default: the notebooks' grids); a
                           full-precision run keeps every image, being the reference of runs sampled later
    SUMMARY/grid.png       the run's grid

About 0.4 MB for 10,000 seeds (about 5 MB for a full-precision run). The classifier features behind FID
(5 MB at 10,000 seeds) are not kept: the bootstrap resamples are what the table needs. So a summary cannot
score another set of seeds, use other bootstrap settings, compare with another reference run or show
images beyond those it keeps; each is refused (`SummaryMismatchError`) with what to do.

`per_seed_fidelity` and `run_scores` read a run or a summary alike: a summary holds what they compute from
the run it summarizes. A summary that keeps every image (a full-precision run's) can be scored again without
its run (`rescore_summary`): one made before KID, precision/recall or the fp images' fingerprint gains them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from modiff.metrics.bootstrap import BootstrapConfig
from modiff.metrics.compare import averaged_distances, psnr, relative_l2
from modiff.pipelines.evaluate import seed_images
from modiff.pipelines.run_folder import READ_ONLY_PARTS, identity_differences, is_summary
from modiff.utils.checksums import sha256_file
from modiff.utils.locks import folder_lock
from modiff.utils.rng import format_seeds, parse_seeds
from modiff.utils.runs import environment, write_json

__all__ = ["SummarySettings", "SummaryMismatchError", "ReferenceImagesError", "PerSeedFidelity", "per_seed_fidelity",
           "stored_fidelity", "run_scores", "summarize_run", "summarize", "find_runs", "full_precision_reference",
           "is_summary_folder", "require_reference_images", "reference_fingerprint", "rescore_summary"]

log = logging.getLogger(__name__)

FORMAT = 4  # 2: a full-precision run keeps every image; 3: KID, precision/recall; 4: fp images' fingerprint, classifier
SCORED = ("fid", "isc", "kid", "prc")  # what Table 1 computes from a run
QUANTIZATION_KEYS = ("quant_preset", "quant_config", "quantized", "weights_from", "reset")


class SummaryMismatchError(ValueError):
    """A summary cannot answer what was asked (other seeds, bootstrap settings or reference run)."""


class ReferenceImagesError(SummaryMismatchError):
    """A summary's per-seed distances were measured against other full-precision images than the reference's
    (its scores still stand: they do not depend on the fp run)."""


@dataclass(frozen=True)
class SummarySettings:
    """How a summary scores its run: the FID reference and bootstrap (as Table 1 asks for them), how many
    leading seeds of a quantized run keep their images (a full-precision run keeps all), and the device of
    the feature extraction."""

    ref: str = "fmnist-train"
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    images: int = 128
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"the number of kept images must be >= 0, got {self.images}")

    def record(self) -> dict[str, Any]:
        return {"ref": self.ref, "bootstrap": asdict(self.bootstrap), "images": self.images,
                "feature_device": self.device, "classifier_weights": _classifier_weights()}


def _classifier_weights() -> str:
    """SHA-256 of the classifier whose feature space the scores are in (`modiff.metrics.fidelity`)."""
    from modiff.metrics.fidelity import EXTRACTOR, extractor_weights

    return extractor_weights(EXTRACTOR, None)


@dataclass(frozen=True)
class PerSeedFidelity:
    """Per seed (in the order asked for): distances of a run's images to a reference run's."""

    seeds: np.ndarray
    rel_l2_pixels: np.ndarray
    psnr_db: np.ndarray

    def averaged(self) -> dict[str, Any]:
        """As `modiff.metrics.compare.fidelity_to_reference` (without features) reports them."""
        return averaged_distances(self.psnr_db, self.rel_l2_pixels)


def _manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{folder} is neither a run nor a summary (no manifest.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder is damaged") from None


def is_summary_folder(folder: str | Path) -> bool:
    path = Path(folder) / "manifest.json"
    return path.is_file() and is_summary(_manifest(Path(folder)))


def _is_run(folder: Path) -> bool:
    path = folder / "manifest.json"
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return False
    return isinstance(manifest, dict) and {"identity", "seeds", "sessions"} <= set(manifest) and not is_summary(manifest)


def per_seed_fidelity(run: str | Path, reference: str | Path, seeds: Sequence[int]) -> PerSeedFidelity:
    """Relative L2 and PSNR of each seed's image in ``run`` to its image in ``reference`` (a full-precision
    run of the same seeds). Either may be a summary: a summarized run gives the distances it stored, if they
    are to this reference; a summarized reference has no images beyond those it keeps."""
    run, reference, seeds = Path(run), Path(reference), [int(s) for s in seeds]
    if is_summary_folder(run):
        return _stored_fidelity(run, reference, seeds)
    try:
        images, base = seed_images(run, seeds), seed_images(reference, seeds)
    except ValueError as err:
        if is_summary_folder(reference):
            raise SummaryMismatchError(f"the distances of {run} to {reference} need the images of the full run "
                                       f"{reference} summarizes ({err}); {_REFERENCE_ADVICE}") from None
        raise
    return PerSeedFidelity(np.asarray(seeds, dtype=np.int64), relative_l2(images, base), psnr(images, base))


_REFERENCE_ADVICE = ("remove that summary so the full-precision run is sampled again, or summarize the full run anew "
                     "(`modiff summarize` keeps every image of a full-precision run)")


def require_reference_images(reference: str | Path, seeds: Sequence[int], pending: Sequence[str]) -> None:
    """Refuse, before anything is sampled, a full-precision ``reference`` that is a summary without the
    image of every seed when ``pending`` (runs still to be sampled) will need it for their per-seed distances."""
    reference = Path(reference)
    if not pending or not is_summary_folder(reference):
        return
    with np.load(reference / "images.npz") as data:
        kept = {int(s) for s in data["seeds"]}
    missing = [int(s) for s in seeds if int(s) not in kept]
    if missing:
        raise SummaryMismatchError(
            f"{reference} is a summary keeping the images of {len(kept)} seeds, not of {len(missing)} others (e.g. "
            f"{format_seeds(missing[:5])}); {', '.join(pending)} will be sampled here and compared with the "
            f"full-precision image of every seed: {_REFERENCE_ADVICE}")


def _stored_fidelity(summary: Path, reference: Path, seeds: list[int]) -> PerSeedFidelity:
    stored = _manifest(summary)["summary"]["reference"]
    if stored is None:
        raise SummaryMismatchError(f"{summary} holds no per-seed distances: no full-precision run was beside the run "
                                   f"when it was summarized; summarize it again with --fp-run")
    diff = identity_differences(stored["identity"], _manifest(reference).get("identity", {}), READ_ONLY_PARTS)
    if diff:
        raise SummaryMismatchError(f"{summary} holds distances to another reference run than {reference} "
                                   f"({'; '.join(diff)}); summarize the run again with --fp-run {reference}")
    with np.load(summary / "per_seed.npz") as data:
        _check_reference_images(summary, reference, stored, data["seeds"], data["rel_l2_pixels"])
    return stored_fidelity(summary, seeds)


def stored_fidelity(summary: str | Path, seeds: Sequence[int]) -> PerSeedFidelity:
    """The per-seed distances a summary stored, to the full-precision run it was summarized against, whichever
    images those were: for statistics of a row's own distances (how they vary between seeds), not for comparing
    rows, which needs one fp run's images (`per_seed_fidelity` checks that)."""
    summary, seeds = Path(summary), [int(s) for s in seeds]
    if not is_summary_folder(summary) or _manifest(summary)["summary"]["reference"] is None:
        raise SummaryMismatchError(f"{summary} is not a summary holding per-seed distances")
    with np.load(summary / "per_seed.npz") as data:
        stored_seeds, rel_l2, psnr_db = data["seeds"], data["rel_l2_pixels"], data["psnr_db"]
    index = {int(s): i for i, s in enumerate(stored_seeds)}
    missing = [s for s in seeds if s not in index]
    if missing:
        raise SummaryMismatchError(f"{summary} holds distances for seeds {format_seeds(index)}, not for "
                                   f"{format_seeds(missing[:5])}...; summarize a run of those seeds")
    rows = [index[s] for s in seeds]
    return PerSeedFidelity(stored_seeds[rows], rel_l2[rows], psnr_db[rows])


def _check_reference_images(summary: Path, reference: Path, stored: Mapping[str, Any], seeds: np.ndarray,
                            rel_l2: np.ndarray) -> None:
    """Stored distances are read only against the full-precision images they were measured on: another fp run
    of the same model and sampling (another GPU, commit or session) has other images, and its distances would
    be wrong without any identity field differing. A summary records the reference's image fingerprint; one
    made before (format 3 and older) is checked on the images it keeps, whose distances must come out the same."""
    if "images_sha256" in stored:
        same = reference_fingerprint(reference, seeds) == stored["images_sha256"]
    else:
        with np.load(summary / "images.npz") as data:
            kept, images = data["seeds"], data["images"]
        order = {int(s): i for i, s in enumerate(kept)}
        rows = [i for i, s in enumerate(seeds) if int(s) in order]  # none kept: nothing to check against
        measured = relative_l2(images[[order[int(seeds[i])] for i in rows]], seed_images(reference, seeds[rows]))
        same = np.allclose(measured, rel_l2[rows], rtol=1e-9, atol=0.0)
    if not same:
        raise ReferenceImagesError(f"{summary} holds distances to other full-precision images than those of "
                                   f"{reference} (a run of the same model and sampling, made on another GPU, by "
                                   f"another commit or in another session); summarize the run again against it "
                                   f"(--fp-run {reference}), or sample the run again beside it")


def reference_fingerprint(reference: str | Path, seeds: Sequence[int]) -> str:
    """sha256 of a full-precision run's images of ``seeds``, in that order: which images a summary's per-seed
    distances were measured against (a run and its summary give the same)."""
    path = Path(reference)
    images = path / ("samples.npz" if (path / "samples.npz").is_file() else "images.npz")
    return _fingerprint(str(path.resolve()), images.stat().st_mtime_ns, tuple(int(s) for s in seeds))


@lru_cache(maxsize=8)
def _fingerprint(reference: str, mtime_ns: int, seeds: tuple[int, ...]) -> str:
    """Cached by file time: a table reads one fp run's fingerprint once per row."""
    return hashlib.sha256(np.ascontiguousarray(seed_images(Path(reference), seeds)).tobytes()).hexdigest()


def run_scores(run: str | Path, seeds: Sequence[int], ref: str = "fmnist-train",
               bootstrap: BootstrapConfig = BootstrapConfig(), device: str = "cpu") -> Any:
    """FID, IS, KID and precision/recall (with their bootstrap intervals and resamples) of the run's images
    of ``seeds`` (`modiff.metrics.fidelity.score`, as Table 1 asks for them). A summary gives the scores it
    stored, if they are over these seeds with this reference and bootstrap (one made before sitting 47 holds
    FID and IS only); a degenerate set raises ValueError either way."""
    from modiff.metrics.fidelity import Scores

    run = Path(run)
    if not is_summary_folder(run):
        return _score_images(run, seeds, ref, bootstrap, device)
    record = json.loads((run / "metrics.json").read_text())
    asked = {"seeds": format_seeds(seeds) if len(seeds) else "", "ref": str(ref), "bootstrap": asdict(bootstrap)}
    stored = {k: record[k] for k in asked}
    if stored != asked or [int(s) for s in seeds] != parse_seeds(record["seeds"]):
        diff = "; ".join(f"{k}: {stored[k]!r} (summary) vs {asked[k]!r} (asked)" for k in asked if stored[k] != asked[k])
        raise SummaryMismatchError(f"{run} was scored with other settings ({diff or 'seed order'}); summarize the run "
                                   f"again with these (`modiff summarize --seeds ... --ref ... --bootstrap-resamples ...`)")
    _check_classifier(run)
    if "error" in record:
        raise ValueError(record["error"])
    resamples = {key[: -len("_resamples")]: np.asarray(values, dtype=np.float64) for key, values in record.items()
                 if key.endswith("_resamples") and values is not None}
    return Scores(record["metrics"], resamples)


def _score_images(folder: Path, seeds: Sequence[int], ref: str, bootstrap: BootstrapConfig, device: str) -> Any:
    """The scores of the images ``folder`` (a run, or a summary keeping them) holds for ``seeds``."""
    from modiff.metrics.fidelity import score

    return score(seed_images(folder, seeds), ref, SCORED, bootstrap=bootstrap, device=device)


def _check_classifier(summary: Path) -> None:
    """A summary's scores are in the feature space of the classifier it was made with: refused where another
    classifier scores the runs it would be compared with. One made before the summary recorded it (format 3
    and older) was scored with the classifier that ships (no summary could take another)."""
    from modiff.metrics.fidelity import shipped_weights

    made_with = _manifest(summary)["summary"]["settings"].get("classifier_weights") or shipped_weights()
    here = _classifier_weights()
    if made_with != here:
        raise SummaryMismatchError(f"{summary} was scored with another classifier (weights sha256 {str(made_with)[:12]}) "
                                   f"than the one here ({here[:12]}): its scores are in another feature space; "
                                   f"summarize its run again here, or score with the classifier it was made with")


def _model_part(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.get("model", {}).items() if k not in QUANTIZATION_KEYS}


def _full_precision(identity: Mapping[str, Any]) -> bool:
    model = identity.get("model", {})
    return model.get("quant_preset") in (None, "fp") and not any(k in model for k in ("quant_config", "quantized"))


def full_precision_reference(run: str | Path, summaries: Optional[str | Path] = None) -> Optional[Path]:
    """The run itself if it is full precision, else the full-precision run beside it (same folder) of the
    same model and sample identity, else such a full-precision summary in ``summaries`` (where the run's own
    summary goes: a full-precision summary keeps every image, so runs sampled in a later sitting, away from
    the fp run, still get their per-seed distances); None when there is none."""
    run = Path(run)
    identity = _manifest(run)["identity"]
    if _full_precision(identity):
        return run
    candidates = sorted(p for p in run.parent.iterdir() if p.is_dir() and p != run and _is_run(p))
    if summaries is not None and Path(summaries).is_dir():
        candidates += sorted(p for p in Path(summaries).iterdir() if p.is_dir() and is_summary_folder(p))
    for other in candidates:
        theirs = _manifest(other)["identity"]
        if _full_precision(theirs) and theirs.get("sample") == identity.get("sample") and \
                _model_part(theirs) == _model_part(identity):
            return other
    return None


def _finished_seeds(run: Path, manifest: Mapping[str, Any], seeds: Optional[Sequence[int]]) -> list[int]:
    """The seeds to summarize, once the run is known finished for them; ValueError saying why not."""
    if is_summary(manifest):
        raise ValueError(f"{run} is already a summary; summarize the run it was made from")
    done = [int(s) for s in manifest.get("seeds", [])]
    npz = run / "samples.npz"
    if not done or not npz.is_file():
        raise ValueError(f"{run} is not a finished run (no seed recorded as done, or no samples.npz): finish it with "
                         f"the command that made it, then summarize it")
    with np.load(npz) as data:
        if sorted(int(s) for s in data["seeds"]) != sorted(done):
            raise ValueError(f"{run}/samples.npz does not hold the seeds its manifest records: the run was interrupted "
                             f"while writing; run the command that made it again, then summarize it")
    wanted = sorted(done) if seeds is None else sorted(int(s) for s in seeds)
    missing = sorted(set(wanted) - set(done))
    if missing:
        raise ValueError(f"{run} has not sampled {len(missing)} of the seeds asked for (e.g. "
                         f"{format_seeds(missing[:5])}); it holds {format_seeds(done)}")
    return wanted


def _scores_record(run: Path, seeds: list[int], settings: SummarySettings, scorer: Callable[..., Any] = run_scores
                   ) -> dict[str, Any]:
    record: dict[str, Any] = {"seeds": format_seeds(seeds), "ref": settings.ref, "bootstrap": asdict(settings.bootstrap)}
    try:
        scored = scorer(run, seeds, settings.ref, settings.bootstrap, settings.device)
    except ValueError as err:  # a degenerate set: the summary keeps the reason, as Table 1 shows it
        return {**record, "error": str(err)}
    resamples = {f"{name}_resamples": [float(v) for v in values] for name, values in scored.resamples.items()}
    return {**record, "metrics": scored.metrics, **resamples}


def _summary_block(run: Path, reference: Optional[Path], seeds: list[int], settings: SummarySettings) -> dict[str, Any]:
    return {"format": FORMAT, "source": str(run.resolve()), "source_manifest_sha256": sha256_file(run / "manifest.json"),
            "seeds": format_seeds(seeds), "settings": settings.record(),
            "reference": None if reference is None else {"run": str(reference.resolve()),
                                                         "identity": _manifest(reference).get("identity"),
                                                         "images_sha256": reference_fingerprint(reference, seeds)}}


def _up_to_date(out: Path, block: Mapping[str, Any]) -> bool:
    if not is_summary_folder(out):
        return False
    old = _manifest(out)["summary"]
    return all(old.get(k) == block[k] for k in ("format", "source_manifest_sha256", "seeds", "settings", "reference"))


def summarize_run(run: str | Path, out: str | Path, reference: Optional[str | Path] = None,
                  settings: SummarySettings = SummarySettings(), seeds: Optional[Sequence[int]] = None) -> Path:
    """Write the summary of the finished run ``run`` (its seeds, or ``seeds``) into ``out``; per-seed
    distances to ``reference`` (a full-precision run of the same model and sampling; none when None).

    Refused: an unfinished run, a run being written (its lock), a reference of another model or sampling or
    lacking seeds, and an ``out`` that exists and is not a summary. An up-to-date summary is kept as it is."""
    from modiff.pipelines.evaluate import check_reference_run
    from modiff.pipelines.generate import SampleConfig

    run, out = Path(run), Path(out)
    if out.exists() and not is_summary_folder(out):
        raise ValueError(f"{out} exists and is not a summary: give a new --out folder")
    with folder_lock(run):  # no writer meanwhile
        manifest = _manifest(run)
        chosen = _finished_seeds(run, manifest, seeds)
        if reference is not None:
            identity = manifest["identity"]
            check_reference_run(reference, chosen, SampleConfig(**identity["sample"]),
                                str(identity["model"].get("model", identity["model"].get("name"))))
        block = _summary_block(run, None if reference is None else Path(reference), chosen, settings)
        if not _up_to_date(out, block):
            _staged(out, lambda staging: _write_summary(run, staging, manifest, block, chosen, reference, settings))
    return out


def _staged(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` a summary into a staging folder beside ``out``, then put it at ``out``: an interrupted write
    leaves the old summary (or none), never half of one."""
    staging = out.parent / f".{out.name}.summary-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_summary(run: Path, staging: Path, manifest: dict[str, Any], block: dict[str, Any], seeds: list[int],
                   reference: Optional[str | Path], settings: SummarySettings) -> None:
    write_json(_scores_record(run, seeds, settings), staging / "metrics.json")
    if reference is not None:
        fidelity = per_seed_fidelity(run, reference, seeds)
        np.savez_compressed(staging / "per_seed.npz", seeds=fidelity.seeds, rel_l2_pixels=fidelity.rel_l2_pixels,
                            psnr_db=fidelity.psnr_db)
    kept = seeds if _full_precision(manifest["identity"]) else seeds[: settings.images]
    np.savez_compressed(staging / "images.npz", images=seed_images(run, kept), seeds=np.asarray(kept, dtype=np.int64))
    shutil.copyfile(run / "grid.png", staging / "grid.png")
    write_json({**manifest, "seeds": seeds, "summary": {**block, "kept_images": format_seeds(kept) if kept else "",
                                                        "made": environment()}}, staging / "manifest.json")


def rescore_summary(summary: str | Path, out: str | Path, settings: SummarySettings = SummarySettings()) -> Path:
    """Score again, into ``out`` (which may be ``summary`` itself), a summary that keeps the image of each of its
    seeds (a full-precision run's), with today's metrics and ``settings``: one made before KID, precision/recall
    or the fp images' fingerprint (format 3 and older) gains them without its run. Its images, distances and grid
    are kept as they are; its manifest keeps what it was made from and says when it was scored again
    (``rescored``). A summary keeping fewer images than seeds is refused: its scores need the run."""
    summary, out = Path(summary), Path(out)
    if out.exists() and not is_summary_folder(out):
        raise ValueError(f"{out} exists and is not a summary: give a new --out folder")
    with folder_lock(summary):
        manifest = _manifest(summary)
        if not is_summary(manifest):
            raise ValueError(f"{summary} is a run, not a summary: summarize it (`modiff summarize`)")
        old = manifest["summary"]
        seeds = parse_seeds(old["seeds"])
        with np.load(summary / "images.npz") as data:
            kept = {int(s) for s in data["seeds"]}
        missing = [s for s in seeds if s not in kept]
        if missing:
            raise ValueError(f"{summary} keeps the images of {len(seeds) - len(missing)} of its {len(seeds)} seeds: "
                             f"only a summary keeping every image (a full-precision run's) can be scored again; "
                             f"summarize its run instead")
        block = {**old, "format": FORMAT, "settings": settings.record(),
                 "reference": _rescored_reference(summary, old, seeds)}
        if not _up_to_date(out, block):
            _staged(out, lambda staging: _write_rescored(summary, staging, manifest, block, seeds, settings))
    return out


def _write_rescored(summary: Path, staging: Path, manifest: dict[str, Any], block: dict[str, Any], seeds: list[int],
                    settings: SummarySettings) -> None:
    for name in ("images.npz", "per_seed.npz", "grid.png"):
        if (summary / name).is_file():
            shutil.copyfile(summary / name, staging / name)
    write_json(_scores_record(summary, seeds, settings, _score_images), staging / "metrics.json")
    write_json({**manifest, "summary": {**block, "rescored": environment()}}, staging / "manifest.json")


def _rescored_reference(summary: Path, old: Mapping[str, Any], seeds: list[int]) -> Optional[dict[str, Any]]:
    """The reference block of a summary scored again: a run summarized against itself (full precision) gains
    the fingerprint of its own images, which the summary keeps; another reference's images are not here, so its
    block stays as it was (checked on the kept images, as format 3 is)."""
    reference = old.get("reference")
    if reference is None or "images_sha256" in reference or reference.get("run") != old.get("source"):
        return reference
    return {**reference, "images_sha256": reference_fingerprint(summary, seeds)}


def _replace(staging: Path, out: Path) -> None:
    """Put the staged summary at ``out``: a rename, the old summary (if any) moved away first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def find_runs(root: str | Path) -> list[Path]:
    """``root`` if it is a run, else every run below it (calibrations and other folders skipped)."""
    root = Path(root)
    if _is_run(root):
        return [root]
    return sorted(p.parent for p in root.rglob("manifest.json") if _is_run(p.parent))


def _summarize_one(run: Path, target: Path, fp_run: Optional[str | Path], settings: SummarySettings,
                   seeds: Optional[Sequence[int]]) -> tuple[Optional[Path], str]:
    """One run's summary, or why it was refused (a worker of `summarize`: errors come back as values)."""
    try:
        if is_summary_folder(run):
            if fp_run is not None or seeds is not None:
                raise ValueError(f"{run} is a summary: it is scored again over its own seeds, its distances kept "
                                 f"(--fp-run and --seeds are for runs)")
            return rescore_summary(run, target, settings), ""
        reference = fp_run if fp_run is not None else full_precision_reference(run, target.parent)
        if reference is None:
            log.warning("%s is summarized without per-seed distances: no full-precision run of its model and sampling "
                        "beside it, nor a summary of one in %s; the notebooks that compare per seed (the sampler "
                        "table, Table 1's distances) will refuse the summary (give --fp-run)", run, target.parent)
        return summarize_run(run, target, reference, settings, seeds), ""
    except ValueError as err:
        return None, str(err)


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def summarize(paths: Sequence[str | Path], out: str | Path, fp_run: Optional[str | Path] = None,
              settings: SummarySettings = SummarySettings(),
              seeds: Optional[Sequence[int]] = None, jobs: int = 1) -> tuple[list[Path], dict[Path, str]]:
    """Summarize runs into ``out``: a run given itself goes to out/<its name>, a folder of runs keeps its
    layout (``summarize(["data/runs/paper"], "summaries/paper")``, then ``modiff reproduce --runs summaries``).
    Per-seed distances are to ``fp_run``, else to the full-precision run beside each run. A summary given
    itself (one keeping every image) is scored again into out/<its name> (`rescore_summary`). ``jobs`` > 1
    summarizes that many runs at once, in processes that share the CPU's threads: for a many-core host,
    where one summary at a time fell behind the GPU sampling the runs (benchmarks/README.md). Returns the
    summaries written (or already up to date) and, per refused run, why (unfinished, being written, ...)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    work = []
    for given in map(Path, paths):
        runs = [given] if is_summary_folder(given) else find_runs(given)
        if not runs:
            raise ValueError(f"{given} holds no run folder (a folder with a manifest.json written by `modiff sample` "
                             f"or the notebooks) nor is a summary")
        work += [(run, Path(out) / (run.relative_to(given) if run != given else run.name)) for run in runs]
    if jobs == 1 or len(work) < 2:
        results = [_summarize_one(run, target, fp_run, settings, seeds) for run, target in work]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers = min(jobs, len(work))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_threads,
                                 initargs=(max(1, (os.cpu_count() or 1) // workers),)) as pool:
            one = partial(_summarize_one, fp_run=fp_run, settings=settings, seeds=seeds)
            results = list(pool.map(one, *zip(*work)))
    made, refused = [], {}
    for (run, _), (summary, why) in zip(work, results):
        if summary is not None:
            made.append(summary)
        else:
            log.warning("%s not summarized: %s", run, why)
            refused[run] = why
    return made, refused
