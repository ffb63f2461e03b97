"""One MR image slice as a DICOM dataset: the header every series we generate needs (the MNI152
federation's, the tests' third-party-style series), written once so that what the site loader reads
is spelt in one place and each generator adds only what makes its scanner its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage


def mr_slice(pixels: np.ndarray, patient: str, uids: Mapping[str, str], sop_uid: str, number: int, *,
             orientation: Sequence[float], position: Sequence[float], spacing: Sequence[float],
             transfer_syntax: str = ExplicitVRLittleEndian, **attributes: Any) -> pydicom.Dataset:
    """`pixels` (rows x columns, stored as 16-bit unsigned) of patient `patient`, in the study, series
    and frame of reference `uids["study"]`, `uids["series"]`, `uids["frame"]`, instance `number`;
    `spacing` is (slice thickness, row spacing, column spacing) in mm. `attributes` (DICOM keywords)
    come last and win: the caller's PatientName, SeriesNumber, Manufacturer and anything else its own."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "20260101", "120000", "", ""
    ds.Modality, ds.InstanceNumber, ds.PositionReferenceIndicator = "MR", number, ""
    ds.ImageOrientationPatient, ds.ImagePositionPatient = list(orientation), list(position)
    ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[2]], spacing[0]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds
