"""Label volumes -> DICOM-SEG (highdicom) that reference their source series slice by slice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from common.class_codes import GENERIC, Coding

SOFTWARE = "fedseg"


def segment_description(number: int, label: str, coding: Coding,
                        algorithm: hd.AlgorithmIdentificationSequence | None) -> hd.seg.SegmentDescription:
    """A segment for one of our classes, coded as given (never guessed from its name)."""
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=coding[0],
        segmented_property_type=coding[1],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if algorithm else hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        algorithm_identification=algorithm,
    )


def write_seg(
    source_images: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    algorithm: hd.AlgorithmIdentificationSequence | None = None,
    uid_entropy: Sequence[str] | None = None,
    codings: Mapping[str, Coding] | None = None,
) -> hd.seg.Segmentation:
    """Write `mask` ([slices, rows, cols] class indices, slices in `source_images` order) as a SEG, each
    class's segment coded as `codings` says (a model's: what its sites' SEGs coded), else `GENERIC`."""
    present = [c for c in range(1, len(class_names)) if (mask == c).any()]
    if not present:
        present = [1]  # a SEG needs one segment; an all-empty organ segment says "nothing here"
    pixel_array = np.stack([(mask == c) for c in present], axis=-1).astype(np.uint8)
    entropy = list(uid_entropy) if uid_entropy else None
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(i + 1, class_names[c], (codings or {}).get(class_names[c], GENERIC), algorithm)
                              for i, c in enumerate(present)],
        series_instance_uid=generate_uid(entropy_srcs=entropy + ["series"] if entropy else None),
        series_number=900,
        sop_instance_uid=generate_uid(entropy_srcs=entropy + ["sop"] if entropy else None),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=SOFTWARE,
        software_versions=SOFTWARE,
        device_serial_number="0",
        omit_empty_frames=bool(pixel_array.any()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg
