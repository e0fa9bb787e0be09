"""De-identification of exported DICOM copies (DICOM PS3.15 Annex E, basic profile).

Patient-, institution- and staff-identifying attributes are removed (or emptied, where the
attribute is type 2 and must stay present), private tags are removed, and every instance /
study / series / frame-of-reference UID is replaced by a new one derived from the original
and a per-workspace secret, so the same original UID always maps to the same new UID (studies
and series stay grouped) but cannot be traced back. Pixel data is kept unchanged.
Burned-in text in the pixels is not detected; check `BurnedInAnnotation` for such data.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

# emptied (type 2 in most IODs: must be present)
EMPTY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "ContentDate", "ContentTime",
)
# removed
REMOVE = (
    "AcquisitionComments", "AcquisitionDate", "AcquisitionDateTime", "AcquisitionTime",
    "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID",
    "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "Allergies",
    "BranchOfService", "ConsultingPhysicianName", "CountryOfResidence", "CurrentPatientLocation",
    "CurveDate", "CurveTime", "CustodialOrganizationSequence", "DerivationDescription",
    "DeviceSerialNumber", "EthnicGroup", "FillerOrderNumberImagingServiceRequest",
    "FrameComments", "ImageComments", "InstitutionAddress", "InstitutionCodeSequence",
    "InstitutionName", "InstitutionalDepartmentName", "IssuerOfPatientID",
    "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank", "NameOfPhysiciansReadingStudy",
    "Occupation", "OperatorIdentificationSequence", "OperatorsName", "OtherPatientIDs",
    "OtherPatientIDsSequence", "OtherPatientNames", "OverlayDate", "OverlayTime",
    "PatientAddress", "PatientAge", "PatientBirthName", "PatientBirthTime", "PatientComments",
    "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientReligiousPreference",
    "PatientSize", "PatientState", "PatientTelephoneNumbers", "PatientWeight",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName",
    "PersonAddress", "PersonName", "PersonTelephoneNumbers", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "ReferencedPatientSequence",
    "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers", "RegionOfResidence", "RequestAttributesSequence",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestingPhysician",
    "RequestingService", "ResponsibleOrganization", "ResponsiblePerson",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepID", "SeriesDate",
    "SeriesDescription", "SeriesTime", "SmokingStatus", "SpecialNeeds", "StationName",
    "StudyDescription", "TextComments", "TextString", "InstanceCreationDate",
    "InstanceCreationTime", "InstanceCreatorUID", "IrradiationEventUID",
    "PregnancyStatus", "LastMenstrualDate", "ProtocolName", "PatientTransportArrangements",
)
# UIDs that name a standard thing (a class, a syntax), not an instance: kept
KEEP_UIDS = {
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
    "ImplementationClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
    "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID",
}


def new_uid(old: str, secret: str) -> str:
    """A UID derived from ``old`` and ``secret``: the same inputs give the same UID."""
    return generate_uid(prefix="2.25.", entropy_srcs=[secret, str(old)])


def deidentify(ds: Dataset, secret: str) -> Dataset:
    """De-identify ``ds`` in place (and its file meta) and return it."""
    ds.remove_private_tags()
    for elem_ds in _datasets(ds):
        for kw in REMOVE:
            if kw in elem_ds:
                delattr(elem_ds, kw)
        for kw in EMPTY:
            if kw in elem_ds:
                elem_ds[kw].value = ""
        for elem in list(elem_ds):
            if elem.VR == "UI" and elem.keyword not in KEEP_UIDS and elem.value:
                if elem.VM > 1:
                    elem.value = [new_uid(v, secret) for v in elem.value]
                else:
                    elem.value = new_uid(elem.value, secret)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medal: DICOM PS3.15 Annex E basic profile"
    return ds


def _datasets(ds: Dataset):
    """``ds`` and every dataset nested in its sequences."""
    yield ds
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _datasets(item)


def deidentify_file(src: Path, dst: Path, secret: str) -> None:
    """Write a de-identified copy of the DICOM file ``src`` to ``dst``."""
    ds = pydicom.dcmread(src)
    deidentify(ds, secret)
    ds.save_as(dst, enforce_file_format=False)
