"""Scan benchmark (issue 13, item 3): how long a site's header scan and load take, and how much
memory they need, on a 10,000-file folder and on the hostile files the loader refuses.

Each folder is loaded by `load_site_series` in a fresh child process, which reports its wall time
and peak RSS (VmHWM: `ru_maxrss` would count the parent's memory at fork) with the RSS after
imports alone, so the figures are the scan's own.
The hostile site and `scan_in_child` are also what the tests use (tests/test_hostile_files.py).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid

from common.seg_writer import write_seg
from simulations.federation import site_profiles, slice_dataset

CLASSES = ("background", "organ", "lesion")
SLICES, MATRIX = 20, 64  # per series: 20 slices of 64 x 64 CT
LABELLED_EVERY = 4  # one series in four has a SEG

def memory_mib(field: str) -> float:
    """This process' VmRSS or VmHWM (peak) in MiB. Unlike `ru_maxrss`, the peak belongs to this
    program alone: exec starts it afresh, where `ru_maxrss` keeps the parent's size at fork."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0), to measure one step's own peak."""
    Path("/proc/self/clear_refs").write_text("5")


CHILD = """
import json, re, sys, time
from common.dicom_io import load_site_series
from simulations.scan_bench import memory_mib, reset_peak
load_site_series(sys.argv[1], ("background", "organ", "lesion"))  # warm-up: lazy imports and decoders loaded
reset_peak()
before = memory_mib("VmRSS")
started = time.perf_counter()
labelled, report = load_site_series(sys.argv[2], ("background", "organ", "lesion"))
wall = time.perf_counter() - started
reasons = [re.sub(r"[0-9]+([.][0-9]+){3,}", "<uid>", s["reason"]).split(":")[0] for s in report.skipped]
print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mib": round(memory_mib("VmHWM"), 1), "rss_before_mib": round(before, 1),
                  "labelled_series_used": len(labelled), "slices_used": sum(len(ls.series.volume) for ls in labelled),
                  "skipped": len(report.skipped), "reasons": {r: reasons.count(r) for r in sorted(set(reasons))}}))
"""


def _raw_deflate(data: bytes, mode: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush(mode)


def write_deflate_bomb(path: Path, dataset: pydicom.Dataset, inflated_mib: int = 1536) -> None:
    """A Deflated Explicit VR Little Endian file whose pixel data inflates to `inflated_mib` MiB of
    zeros from about 1 KB per MiB on disk: the same deflated block repeated (a decompression bomb)."""
    header = copy.deepcopy(dataset)
    del header.PixelData
    header.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    plain = io.BytesIO()
    header.save_as(plain, enforce_file_format=True)  # pydicom deflates the dataset, the file meta stays plain
    raw = plain.getvalue()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")  # (0002,0000) UL group length at 132, its value at 140
    body = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated_mib * 2**20)
    block = _raw_deflate(bytes(2**20), zlib.Z_FULL_FLUSH)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw[:meta_end] + _raw_deflate(body + pixel_header, zlib.Z_FULL_FLUSH) + block * inflated_mib
                     + _raw_deflate(b"", zlib.Z_FINISH))


def write_rle_claiming(path: Path, dataset: pydicom.Dataset, rows: int, columns: int) -> None:
    """A tiny RLE Lossless file whose header claims rows x columns pixels: one short frame of two
    segments, each a few runs of zeros (a decoder would allocate the claim first)."""
    claim = copy.deepcopy(dataset)
    claim.Rows, claim.Columns = rows, columns
    segment = b"\x81\x00" * 4  # four runs of 128 zeros
    frame = struct.pack("<16I", 2, 64, 64 + len(segment), *[0] * 13) + segment * 2
    claim.PixelData = encapsulate([frame])
    claim["PixelData"].VR, claim["PixelData"].is_undefined_length = "OB", True
    claim.file_meta.TransferSyntaxUID = RLELossless
    path.parent.mkdir(parents=True, exist_ok=True)
    claim.save_as(path, enforce_file_format=True)


def _ct_series(patient: str, slices: int, rng: np.random.Generator) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """One small CT series (a bright square organ in noise) and its organ mask, written as the
    built-in federation writes its scanners' slices."""
    profile = replace(site_profiles(1, size="tiny")[0], matrix=MATRIX, pixel_spacing=3.0, slices=slices, slice_thickness=5.0)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    geometry = {"orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "positions": [[-100.0, -100.0, 5.0 * k] for k in range(slices)]}
    mask = np.zeros((slices, MATRIX, MATRIX), dtype=np.uint8)
    mask[:, 20:44, 20:44] = 1
    stored = (1024 + rng.normal(0, 20, mask.shape) + 80 * mask).astype(np.int16)
    return [slice_dataset(profile, patient, k, stored[k], geometry, uids) for k in range(slices)], mask


def _save(datasets: list[pydicom.Dataset], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


def write_honest_site(site: Path, files: int) -> dict:
    """`files` DICOM files: CT series of SLICES slices, one in LABELLED_EVERY with a SEG."""
    rng = np.random.default_rng(0)
    written = series = labelled = 0
    while written < files:
        with_seg = series % LABELLED_EVERY == 0 and files - written > 1
        slices = min(SLICES, files - written - int(with_seg))
        patient = f"P{series:05d}"
        datasets, mask = _ct_series(patient, slices, rng)
        _save(datasets, site / patient / "CT")
        if with_seg:
            write_seg(datasets, mask, CLASSES, site / patient / "SEG" / "labels.dcm")
            labelled += 1
        written += slices + int(with_seg)
        series += 1
    return {"files": written, "series": series, "labelled_series": labelled, "slices": written - labelled}


def write_hostile_site(site: Path, store: Path) -> dict:
    """One honest labelled series next to every hostile file of issue 13: a deflate bomb, tiny RLE
    files claiming 16000² and 65535², a NaN rescale slope, another patient's SEG, masks.csv paths
    leaving the site, and symbolic links (a linked patient folder from `store`, a loop, a broken link)."""
    rng = np.random.default_rng(1)
    honest, mask = _ct_series("honest", SLICES, rng)
    _save(honest, store / "honest" / "CT")
    write_seg(honest, mask, CLASSES, store / "honest" / "SEG" / "labels.dcm")
    site.mkdir(parents=True, exist_ok=True)
    (site / "honest").symlink_to(store / "honest", target_is_directory=True)  # a PACS mount links patients in
    (store / "honest" / "loop").symlink_to(site, target_is_directory=True)
    (site / "gone.dcm").symlink_to(store / "nowhere.dcm")
    bomb, _ = _ct_series("bomb", 1, rng)
    write_deflate_bomb(site / "bomb" / "bomb.dcm", bomb[0])
    for size in (16000, 65535):
        claim, claim_mask = _ct_series(f"claim-{size}", 1, rng)
        write_rle_claiming(site / f"claim-{size}" / "claim.dcm", claim[0], size, size)
        write_seg(claim, claim_mask, CLASSES, site / f"claim-{size}" / "SEG" / "labels.dcm")
    nan, nan_mask = _ct_series("nan", SLICES, rng)
    for ds in nan:
        ds.RescaleSlope = float("nan")
    _save(nan, site / "nan" / "CT")
    write_seg(nan, nan_mask, CLASSES, site / "nan" / "SEG" / "labels.dcm")
    victim, victim_mask = _ct_series("victim", SLICES, rng)
    _save(victim, site / "victim" / "CT")
    intruder = [copy.deepcopy(ds) for ds in victim]
    study, frame = generate_uid(), generate_uid()
    for ds in intruder:
        ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "intruder", study, frame
    write_seg(intruder, victim_mask, CLASSES, site / "victim" / "SEG" / "foreign.dcm")
    with open(site / "masks.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["series_instance_uid", "mask"], [victim[0].SeriesInstanceUID, "../../etc/mask.nii.gz"],
                                  [victim[0].SeriesInstanceUID, "/etc/mask.nii.gz"]])
    return {"files": sum(1 for p in site.rglob("*") if not p.is_dir()) + sum(1 for p in store.rglob("*") if p.is_file())}


def scan_in_child(warm_up: Path, folder: Path) -> dict:
    """Load `folder` as a site in a fresh Python process, after loading `warm_up` there (so the
    figures leave out what any first load imports): wall time, peak RSS, what it used and refused."""
    run = subprocess.run([sys.executable, "-c", CHILD, str(warm_up), str(folder)], capture_output=True, text=True, timeout=3600,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode != 0:
        raise RuntimeError(f"scan of {folder} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def _readme(result: dict) -> str:
    rows = [("honest", f"{result['honest_site']['files']:,} files ({result['honest_site']['series']} series of "
                       f"{SLICES} x {MATRIX}² CT, {result['honest_site']['labelled_series']} with a SEG)"),
            ("hostile", "1 honest labelled series + deflate bomb (1.5 GiB inflated), RLE claiming 16000² and 65535², "
                        "NaN slope series, foreign-patient SEG, masks.csv escaping, symlink loop and broken link")]
    lines = ["# Site scan benchmark (issue 13, item 3)", "",
             f"{result['machine']}; each folder loaded by `load_site_series` in a fresh child process, after a warm-up "
             "load of one small labelled series there (imports, decoders); peak RSS = VmHWM, reset after the warm-up.", "",
             "| folder | contents | wall (s) | peak RSS (MiB) | RSS before the scan (MiB) | scan's own (MiB) | series used | skipped |",
             "|---|---|---|---|---|---|---|---|"]
    for name, contents in rows:
        r = result[name]
        lines.append(f"| {name} | {contents} | {r['wall_s']} | {r['peak_rss_mib']} | {r['rss_before_mib']} | "
                     f"{r['peak_rss_mib'] - r['rss_before_mib']:.1f} | {r['labelled_series_used']} | {r['skipped']} |")
    lines += ["", "Reasons in the hostile folder's load report: "
              + "; ".join(f"{reason} ({count})" for reason, count in result["hostile"]["reasons"].items()), ""]
    return "\n".join(lines)


def run_scan_bench(out: Path, files: int = 10_000) -> dict:
    """Write a `files`-file site and the hostile files, scan each in a child process, and write
    `out/scan.json` and `out/README.md`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedseg-scan-bench-") as tmp:
        root = Path(tmp)
        result = {"machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}, "
                             f"pydicom {pydicom.__version__}",
                  "honest_site": write_honest_site(root / "honest", files),
                  "hostile_site": write_hostile_site(root / "hostile", root / "pacs-mount")}
        write_honest_site(root / "warm-up", 2 * SLICES + 1)
        result["honest"] = scan_in_child(root / "warm-up", root / "honest")
        result["hostile"] = scan_in_child(root / "warm-up", root / "hostile")
    (out / "scan.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "README.md").write_text(_readme(result))
    return result

