"""TID 1500 Measurement Report (Comprehensive 3D SR) of both nerves, next to their SEG.

A PACS shows a SEG's shape but not what a surgeon plans with: each nerve's length, volume and
calibre, by stretch, and whether the node trusts its result. The report carries the figures of
:mod:`ian_node.segment.measure` and the per-side QA (:class:`ian_node.segment.qa.SideQA`), and
references the SEG's segments and through them the source images. Pure: the worker and
``ian-node predict`` call :func:`build_measurement_report` after building the SEG.

Content, per side with voxels, one TID 1411 volumetric group that references the side's segment:
- tracking identifier "Inferior alveolar nerve, right|left" (a UID derived from the SEG and side),
  finding site SCT 84782009 "Peripheral nerve" with laterality SCT 24028007 / 7771000 (REFERENCE.md:
  the specific nerve has no code in pydicom's dictionary, so its name goes in the identifier);
- whole tract: SCT 410668003 Length (UCUM mm), SCT 118565006 Volume (mm3), SCT 81827009 Diameter (mm)
  twice, with derivation SCT 373098007 Mean and SCT 255605001 Minimum;
- per region the same four, each with a finding site whose topographical modifier names the stretch:
  SCT 40415009 Proximal (ramus), SCT 11896004 Intermediate (body), SCT 46053002 Distal (anterior
  loop / mental foramen); a region without a full diameter window has no diameters;
- QA: qualitative evaluation DCM 111050 "Quality Assessment" = DCM 111237 (PASS), 111236 (WARN) or
  111235 (FAIL), and one TEXT DCM 113010 "Quality Issue" per reason.
A side without voxels gets a TID 1501 group (finding site and QA, no ROI, no measurements), also
when the SEG left its segment out (``empty_segments = "omit"``). Segments are found by their
laterality (`ian_node.segment.seg.segment_labels`), never by number: a left-only SEG's segment 1 is
the left nerve.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ian_node import __version__
from ian_node.segment.measure import Region, RegionMeasurements, TractMeasurements
from ian_node.segment.metadata import sanitised_source
from ian_node.segment.qa import SideQA, Verdict
from ian_node.segment.seg import (
    LEFT_LABEL,
    PROPERTY_TYPE,
    RIGHT_LABEL,
    SEGMENT_LABELS,
    SegmentationSourceError,
    segment_labels,
)
from ian_node.segment.volume import SeriesVolume
from ian_node.uids import derived_uid

logger = logging.getLogger(__name__)

SIDES: dict[str, int] = {"right": RIGHT_LABEL, "left": LEFT_LABEL}
_LATERALITY: dict[str, Code] = {"right": codes.SCT.Right, "left": codes.SCT.Left}
#: The stretch of the nerve a region is, as a topographical modifier (CID 2) of its finding site.
REGION_MODIFIERS: dict[Region, Code] = {
    Region.RAMUS: codes.SCT.Proximal, Region.BODY: codes.SCT.Intermediate, Region.MENTAL: codes.SCT.Distal,
}
VERDICT_CODES: dict[Verdict, Code] = {
    Verdict.PASS: codes.DCM.UsableMeetsTheQualityControlStandard,
    Verdict.WARN: codes.DCM.UsableDoesNotMeetTheQualityControlStandard,
    Verdict.FAIL: codes.DCM.UnusableQualityRendersImageUnusable,
}
#: Procedure reported (CID 100) by the source's modality.
_PROCEDURES: dict[str, Code] = {"MR": codes.cid100.MRIUnspecifiedBodyRegion}
#: SR series numbers sit this far above their SEG's, so a result's SEG and SR pair up by number.
SR_SERIES_OFFSET = 500


class MeasurementReportError(ValueError):
    """The SEG, source and measurements do not belong together."""


def _finding_site(side: str, region: Region | None = None) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(PROPERTY_TYPE, laterality=_LATERALITY[side],
                             topographical_modifier=None if region is None else REGION_MODIFIERS[region])


def _measurements(length: float, volume: float, mean: float | None, low: float | None,
                  site: hd.sr.FindingSite | None) -> list[hd.sr.Measurement]:
    """Length, volume, mean and minimum diameter; the group's algorithm identification covers them."""
    sites = None if site is None else [site]
    out = [
        hd.sr.Measurement(codes.SCT.Length, round(length, 2), codes.UCUM.Millimeter, finding_sites=sites),
        hd.sr.Measurement(codes.SCT.Volume, round(volume, 2), codes.UCUM.CubicMillimeter, finding_sites=sites),
    ]
    for value, derivation in ((mean, codes.SCT.Mean), (low, codes.SCT.Minimum)):
        if value is not None:
            out.append(hd.sr.Measurement(codes.SCT.Diameter, round(value, 2), codes.UCUM.Millimeter,
                                         derivation=derivation, finding_sites=sites))
    return out


def _region_measurements(region: RegionMeasurements, side: str) -> list[hd.sr.Measurement]:
    return _measurements(region.length_mm, region.volume_mm3, region.mean_diameter_mm, region.min_diameter_mm,
                         _finding_site(side, region.region))


def _qa_items(qa: SideQA | None) -> tuple[list[hd.sr.QualitativeEvaluation], list[hd.sr.TextContentItem]]:
    if qa is None:
        return [], []
    verdict = Verdict(qa.verdict)
    evaluation = hd.sr.QualitativeEvaluation(codes.DCM.QualityAssessment, VERDICT_CODES[verdict])
    reasons = [hd.sr.TextContentItem(codes.DCM.QualityIssue, reason, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
               for reason in qa.reasons]
    return [evaluation], reasons


def measurement_algorithm() -> hd.sr.AlgorithmIdentification:
    """The measuring algorithm as the report names it (the segmenting one is in the SEG)."""
    return hd.sr.AlgorithmIdentification(name="ian-node measure", version=__version__,
                                         parameters=["centreline: 3D skeleton, longest geodesic path",
                                                     "diameter: equivalent, 5 mm windows"])


def _source_datasets(source: SeriesVolume | Sequence[Dataset]) -> list[Dataset]:
    frames = source.frames if isinstance(source, SeriesVolume) else None
    datasets = list({id(f.dataset): f.dataset for f in frames}.values()) if frames is not None else list(source)
    if not datasets:
        raise MeasurementReportError("no source images given")
    return datasets


def _check_pairing(seg: Dataset, datasets: Sequence[Dataset]) -> None:
    if str(seg.get("Modality", "")) != "SEG":
        raise MeasurementReportError(f"seg must be a Segmentation, got modality {seg.get('Modality')!r}")
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.get("ReferencedSeriesSequence", [])
                  for item in series.get("ReferencedInstanceSequence", [])}
    given = {str(ds.SOPInstanceUID) for ds in datasets}
    if not referenced & given:
        raise MeasurementReportError(f"SEG {seg.SOPInstanceUID} references none of the {len(given)} source "
                                     "instances given")
    if str(datasets[0].StudyInstanceUID) != str(seg.StudyInstanceUID):
        raise MeasurementReportError(f"SEG {seg.SOPInstanceUID} is in study {seg.StudyInstanceUID}, the source in "
                                     f"{datasets[0].StudyInstanceUID}")


def _referenced_segment(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    """The SEG's segment `number` with the source images its frames derive from.

    `hd.sr.ReferencedSegment.from_segmentation` reads each frame's segment from the per-frame groups
    only; highdicom writes it in the shared groups when a SEG has one segment (a side left out).
    """
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    sources: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for item in seg.PerFrameFunctionalGroupsSequence:
        if int((item.get("SegmentIdentificationSequence") or shared)[0].ReferencedSegmentNumber) != number:
            continue
        for derivation in item.get("DerivationImageSequence", []):
            for image in derivation.get("SourceImageSequence", []):
                uid = str(image.ReferencedSOPInstanceUID)
                frames = image["ReferencedFrameNumber"] if "ReferencedFrameNumber" in image else None
                numbers = None if frames is None else [int(f) for f in (frames.value if frames.VM > 1 else [frames.value])]
                sources.setdefault(uid, hd.sr.SourceImageForSegmentation(str(image.ReferencedSOPClassUID), uid, numbers))
    if not sources:
        raise MeasurementReportError(f"SEG {seg.SOPInstanceUID}: no frame of segment {number} names its source")
    return hd.sr.ReferencedSegment(seg.SOPClassUID, seg.SOPInstanceUID, number, source_images=list(sources.values()))


def _side_group(seg: Dataset, side: str, segment: int | None, measured: TractMeasurements | None,
                qa: SideQA | None, algorithm: hd.sr.AlgorithmIdentification, uid_prefix: str | None
                ) -> (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                      | hd.sr.MeasurementsAndQualitativeEvaluations):
    """One side's group: TID 1411 referencing segment number `segment` when measured, else TID 1501."""
    label = SIDES[side]
    tracking = hd.sr.TrackingIdentifier(uid=derived_uid(uid_prefix, "ian-node-sr", seg.SOPInstanceUID, side),
                                        identifier=SEGMENT_LABELS[label])
    evaluations, reasons = _qa_items(qa)
    if measured is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_sites=[_finding_site(side)], algorithm_id=algorithm,
            qualitative_evaluations=evaluations or None)
    else:
        items = _measurements(measured.length_mm, measured.volume_mm3, measured.mean_diameter_mm,
                              measured.min_diameter_mm, None)
        for region in measured.regions:
            items.extend(_region_measurements(region, side))
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=_referenced_segment(seg, segment),
            finding_sites=[_finding_site(side)], algorithm_id=algorithm, measurements=items,
            qualitative_evaluations=evaluations or None)
    # TID 1411/1501 hold free-text evaluations too; highdicom's constructors take coded ones only.
    group[0].ContentSequence.extend(reasons)
    return group




def build_measurement_report(
    seg: Dataset,
    source: SeriesVolume | Sequence[Dataset],
    measurements: Mapping[str, TractMeasurements | None],
    *,
    qa: Sequence[SideQA] | None = None,
    series_number: int | None = None,
    series_description: str = "IAN measurements (AI)",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    uid_prefix: str | None = None,
    manufacturer: str = "ian-node",
    manufacturer_model_name: str = "ian-node",
    software_versions: str = __version__,
    device_serial_number: str = "0",
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of `measurements` ({"right", "left"}: `measure_labels`' output) over `seg`.

    `seg` is the SEG the measurements were taken from (each side's segment found by its laterality;
    a side it left out gets its QA group without a segment reference), `source` its source images. The patient and study come from the SEG, through the same
    sanitised view the SEG builder uses. UIDs not given derive from the SEG's SOP Instance UID, so a
    rebuilt SEG and its report pair up again; the series number defaults to the SEG's + 500.
    """
    unknown = sorted(set(measurements) - set(SIDES))
    if unknown:
        raise ValueError(f"measurements has sides {unknown}; expected 'right' and/or 'left'")
    by_side = {q.side: q for q in qa or ()}
    if set(by_side) - set(SIDES):
        raise ValueError(f"qa has sides {sorted(set(by_side) - set(SIDES))}; expected 'right' and/or 'left'")
    datasets = _source_datasets(source)
    _check_pairing(seg, datasets)
    try:
        numbers = {label: number for number, label in segment_labels(seg).items()}
    except SegmentationSourceError as exc:
        raise MeasurementReportError(f"SEG {seg.SOPInstanceUID}: its segments cannot be told apart: {exc}") from exc
    for side, measured in measurements.items():
        if measured is not None and SIDES[side] not in numbers:
            raise MeasurementReportError(f"the {side} side has measurements but SEG {seg.SOPInstanceUID} has no "
                                         f"{side} segment")
    algorithm = measurement_algorithm()
    groups = [_side_group(seg, side, numbers.get(SIDES[side]), measurements.get(side), by_side.get(side), algorithm,
                          uid_prefix)
              for side in SIDES if side in measurements or side in by_side]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(uid_prefix, "ian-node-device", manufacturer, manufacturer_model_name, device_serial_number),
        name="ian-node", manufacturer_name=manufacturer, model_name=manufacturer_model_name,
        serial_number=device_serial_number)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    procedure = _PROCEDURES.get(str(datasets[0].get("Modality", "")), codes.SCT.ImagingProcedure)
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=procedure,
                                     imaging_measurements=groups, title=codes.cid7021.ImagingMeasurementReport)
    header = sanitised_source(seg, extra_text=[series_description])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[header.dataset, *datasets],
        content=report[0],
        series_instance_uid=series_instance_uid or derived_uid(uid_prefix, "ian-node-sr", seg.SOPInstanceUID,
                                                               "series"),
        series_number=int(seg.SeriesNumber) + SR_SERIES_OFFSET if series_number is None else series_number,
        sop_instance_uid=sop_instance_uid or derived_uid(uid_prefix, "ian-node-sr", seg.SOPInstanceUID,
                                                         "instance"),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        specific_character_set=header.specific_character_set,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
    )
    header.finish(sr)
    sr.SeriesDescription = series_description
    logger.info("built SR %s (series %s) for SEG %s: %d measurement groups", sr.SOPInstanceUID,
                sr.SeriesInstanceUID, seg.SOPInstanceUID, len(groups))
    return sr
