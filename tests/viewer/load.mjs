/**
 * Loads DICOM objects in Node the way the OHIF viewer loads them, with the libraries OHIF 3.13 ships (dcmjs 0.52,
 * @cornerstonejs/adapters and core 5.6.8), and prints one JSON document of what its loaders extracted. The OHIF
 * logic ported here follows OHIF's sources: extensions/cornerstone-dicom-{seg,sr,pmap}/src/getSopClassHandlerModule.ts
 * and platform/core/src/classes/MetadataProvider.ts.
 *
 *   node load.mjs FILE...
 *
 * FILEs are the result objects and the source images they reference. Each file is read and naturalized with dcmjs,
 * as OHIF's local-file data source does; the source images form "display sets" (one per series) behind a metadata
 * provider modelled on OHIF's (platform/core/src/classes/MetadataProvider.ts). Then, per SOP class:
 *
 * - SEG: OHIF's cornerstone-dicom-seg display-set rules (ReferencedSeriesSequence names the referenced display set),
 *   then @cornerstonejs/adapters `adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer` (the Part 10
 *   buffer entry of the same labelmap loader, `createLabelmapsFromSegImageIds`, that OHIF calls through
 *   `createFromDicomSegImageId`): segments, and each segment's voxels as placed on the source images.
 * - SR: OHIF's cornerstone-dicom-sr rules (extensions/cornerstone-dicom-sr/src/getSopClassHandlerModule.ts: only a
 *   TID 1500 Imaging Measurement Report; `_getMeasurements` merges groups by tracking UID and labels each NUM
 *   "value unit"; `_getReferencedImagesList` reads the image library) and its `isRehydratable` check through the
 *   adapters' `adaptersSR.Cornerstone3D.MeasurementReport.getAdapterForTrackingIdentifier`; plus each measurement
 *   group's content (measurements, evaluations, texts, image references) read from the dcmjs dataset.
 * - Parametric Map: OHIF's cornerstone-dicom-pmap rules (ReferencedSeriesSequence; the referenced series as a
 *   cornerstone volume, its images sorted along the scan axis), then
 *   `adaptersPMAP.Cornerstone3D.ParametricMap.generateToolState` on that volume's imageIds (what OHIF calls).
 *   "volume" is what OHIF then shows on each image of the volume: the adapter's values in order (it returns the
 *   frames in the map's own order), times `ohifDisplayScale` (OHIF ignores the Real World Value Mapping), and
 *   "realWorld" the same values after the mapping of the frame they come from. "frames": each frame's source
 *   image (DerivationImageSequence) and mapping.
 * - Secondary Capture: its image pixel module as OHIF's metadata provider gives it, and a digest of its pixels.
 *
 * Output: {"objects": [{"path", "kind", ..., "warnings"} | {"path", "kind", "error", "warnings"}]}, in argument
 * order; "warnings" holds what the loaders logged as warnings or errors. Exit status 1 when a loader failed (threw,
 * found no segment, met a map frame from outside the referenced series), else 0.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

import dcmjs from 'dcmjs';
import { metaData, utilities as csUtilities } from '@cornerstonejs/core';
import { adaptersPMAP, adaptersSEG, adaptersSR } from '@cornerstonejs/adapters';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

const SOP_CLASSES = {
  '1.2.840.10008.5.1.4.1.1.66.4': 'SEG',
  '1.2.840.10008.5.1.4.1.1.66.7': 'SEG',
  '1.2.840.10008.5.1.4.1.1.30': 'PMAP',
  '1.2.840.10008.5.1.4.1.1.88.11': 'SR',
  '1.2.840.10008.5.1.4.1.1.88.22': 'SR',
  '1.2.840.10008.5.1.4.1.1.88.33': 'SR',
  '1.2.840.10008.5.1.4.1.1.88.34': 'SR',
  '1.2.840.10008.5.1.4.1.1.7': 'SC',
};
const TOLERANCE = 0.001; // what OHIF passes to the SEG loader
const OHIF_PMAP_DISPLAY_SCALE = 100; // OHIF's _loadParametricMap multiplies the adapter's values by 100
const CODES = {
  ImagingMeasurementReport: '126000',
  ImageLibrary: '111028',
  ImageLibraryGroup: '126200',
  ImagingMeasurements: '126010',
  MeasurementGroup: '125007',
  TrackingIdentifier: '112039',
  TrackingUniqueIdentifier: '112040',
  Finding: '121071',
  AlgorithmName: '111001',
  AlgorithmVersion: '111003',
};

// The adapters and dcmjs log to the console: keep stdout for the JSON document, collect warnings and errors (per
// object loaded).
let warnings = [];
const describe = value => (typeof value === 'string' ? value : value instanceof Error ? value.message : '');
for (const level of ['log', 'info', 'debug']) {
  console[level] = (...args) => process.stderr.write(`${args.map(describe).join(' ')}\n`);
}
for (const level of ['warn', 'error']) {
  console[level] = (...args) => warnings.push(args.map(describe).filter(Boolean).join(' '));
}
dcmjs.log.rebuild(); // dcmjs's loglevel logger bound the console methods it found at import

/** A sequence as an array (dcmjs naturalizes sequences to arrays; a missing one is empty). */
const items = sequence => (sequence == null ? [] : Array.isArray(sequence) ? sequence : [sequence]);
const first = sequence => items(sequence)[0];
const numbers = value => (value == null ? undefined : items(value).map(Number));
const conceptOf = item => first(item?.ConceptNameCodeSequence);
const codeValueOf = item => conceptOf(item)?.CodeValue;
const meaningOf = code => first(code)?.CodeMeaning;

/** One Part 10 file, read and naturalized as OHIF's local-file data source does. */
function readInstance(path, index) {
  const bytes = readFileSync(path);
  const arrayBuffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const dicomData = DicomMessage.readFile(arrayBuffer);
  const instance = DicomMetaDictionary.naturalizeDataset(dicomData.dict);
  instance._meta = DicomMetaDictionary.namifyDataset(dicomData.meta);
  const imageId = `dicomfile:${index}`;
  instance.imageId = imageId;
  return { path, arrayBuffer, instance, imageId, kind: SOP_CLASSES[instance.SOPClassUID] ?? 'image' };
}

/** The metadata modules the adapters and @cornerstonejs/core read, computed from the naturalized instance the way
 * OHIF's MetadataProvider does (`instance`, then `_getCornerstoneDICOMImageLoaderTag` / `WADO_IMAGE_LOADER`). */
class InstanceMetadataProvider {
  constructor() {
    this.instances = new Map();
  }

  add(imageId, instance) {
    this.instances.set(imageId, instance);
  }

  get(type, imageId) {
    const instance = this.instances.get(imageId);
    if (!instance) {
      return undefined;
    }
    if (type === 'instance') {
      return instance;
    }
    const module = MODULES[type];
    return module ? module(instance) : undefined;
  }
}

const MODULES = {
  generalSeriesModule: instance => ({
    modality: instance.Modality,
    seriesInstanceUID: instance.SeriesInstanceUID,
    seriesNumber: Number(instance.SeriesNumber),
    studyInstanceUID: instance.StudyInstanceUID,
  }),
  generalImageModule: instance => ({
    sopInstanceUID: instance.SOPInstanceUID,
    instanceNumber: Number(instance.InstanceNumber),
  }),
  sopCommonModule: instance => ({ sopClassUID: instance.SOPClassUID, sopInstanceUID: instance.SOPInstanceUID }),
  imagePixelModule: instance => ({
    samplesPerPixel: Number(instance.SamplesPerPixel),
    photometricInterpretation: instance.PhotometricInterpretation,
    rows: Number(instance.Rows),
    columns: Number(instance.Columns),
    bitsAllocated: Number(instance.BitsAllocated),
    bitsStored: Number(instance.BitsStored),
    highBit: Number(instance.HighBit),
    pixelRepresentation: Number(instance.PixelRepresentation),
    planarConfiguration: instance.PlanarConfiguration == null ? undefined : Number(instance.PlanarConfiguration),
  }),
  imagePlaneModule: instance => {
    const orientation = numbers(instance.ImageOrientationPatient) ?? [1, 0, 0, 0, 1, 0];
    const [rowPixelSpacing, columnPixelSpacing] = numbers(instance.PixelSpacing) ?? [1, 1];
    return {
      frameOfReferenceUID: instance.FrameOfReferenceUID,
      rows: Number(instance.Rows),
      columns: Number(instance.Columns),
      imageOrientationPatient: orientation,
      rowCosines: orientation.slice(0, 3),
      columnCosines: orientation.slice(3, 6),
      imagePositionPatient: numbers(instance.ImagePositionPatient) ?? [0, 0, 0],
      sliceThickness: Number(instance.SliceThickness),
      sliceLocation: Number(instance.SliceLocation),
      spacingBetweenSlices: Number(instance.SpacingBetweenSlices),
      pixelSpacing: [rowPixelSpacing, columnPixelSpacing],
      rowPixelSpacing,
      columnPixelSpacing,
    };
  },
};

/** The source images as OHIF display sets: one per series, instances in InstanceNumber order. */
function displaySets(sources) {
  const bySeries = new Map();
  for (const source of sources) {
    const uid = source.instance.SeriesInstanceUID;
    bySeries.set(uid, [...(bySeries.get(uid) ?? []), source]);
  }
  for (const members of bySeries.values()) {
    members.sort((a, b) => Number(a.instance.InstanceNumber) - Number(b.instance.InstanceNumber));
  }
  return new Map([...bySeries].map(([uid, members]) => [uid, { imageIds: members.map(member => member.imageId) }]));
}

/** OHIF's rule for a SEG or Parametric Map display set: its ReferencedSeriesSequence names the referenced display
 * set, which must be loaded. */
function referencedDisplaySet(instance, series, what) {
  const referenced = first(instance.ReferencedSeriesSequence);
  if (!referenced) {
    throw new Error(`ReferencedSeriesSequence is missing for the ${what}`);
  }
  const displaySet = series.get(referenced.SeriesInstanceUID);
  if (!displaySet) {
    throw new Error(`the ${what}'s referenced series ${referenced.SeriesInstanceUID} is not among the source images`);
  }
  return { referenced, displaySet };
}

function referencedSeriesSummary(referenced) {
  return {
    seriesInstanceUID: referenced.SeriesInstanceUID,
    instances: items(referenced.ReferencedInstanceSequence).map(item => item.ReferencedSOPInstanceUID),
  };
}

/** SOP Instance UID of each source imageId. */
function sopInstanceUIDs(imageIds) {
  return new Map(imageIds.map(imageId => [imageId, metaData.get('generalImageModule', imageId).sopInstanceUID]));
}

async function loadSegmentation(object, series) {
  const { instance } = object;
  const { referenced, displaySet } = referencedDisplaySet(instance, series, 'SEG');
  const { imageIds } = displaySet;
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds, object.arrayBuffer, { metadataProvider: metaData, tolerance: TOLERANCE });
  const uidOf = sopInstanceUIDs(imageIds);
  const pixels = new Map(); // segment number -> (source SOP Instance UID -> row-major pixel indices)
  for (const image of items(result.labelMapImages).flat()) {
    const values = image.voxelManager?.getScalarData?.() ?? image.getPixelData();
    const source = uidOf.get(image.referencedImageId);
    values.forEach((value, index) => {
      if (value) {
        const bySource = pixels.get(value) ?? new Map();
        bySource.set(source, [...(bySource.get(source) ?? []), index]);
        pixels.set(value, bySource);
      }
    });
  }
  const segments = result.segMetadata.data.slice(1).map(segment => {
    const bySource = pixels.get(Number(segment.SegmentNumber)) ?? new Map();
    const algorithm = first(segment.SegmentationAlgorithmIdentificationSequence);
    return {
      number: Number(segment.SegmentNumber),
      label: segment.SegmentLabel,
      algorithmType: segment.SegmentAlgorithmType,
      algorithmName: segment.SegmentAlgorithmName ?? algorithm?.AlgorithmName,
      algorithmVersion: algorithm?.AlgorithmVersion,
      category: meaningOf(segment.SegmentedPropertyCategoryCodeSequence),
      type: meaningOf(segment.SegmentedPropertyTypeCodeSequence),
      frames: bySource.size,
      voxels: [...bySource.values()].reduce((sum, indices) => sum + indices.length, 0),
      pixelsBySource: Object.fromEntries(bySource),
    };
  });
  if (!segments.length || segments.every(segment => segment.voxels === 0)) {
    throw new Error('the SEG loader placed no segment on the source images');
  }
  return {
    sopInstanceUID: instance.SOPInstanceUID,
    seriesInstanceUID: instance.SeriesInstanceUID,
    seriesDescription: instance.SeriesDescription,
    referencedSeries: referencedSeriesSummary(referenced),
    overlappingSegments: Boolean(result.overlappingSegments),
    segments,
  };
}

/** OHIF's `_getReferencedImagesList`: the image library's first group's images. */
function ohifReferencedImages(content) {
  const library = content.find(item => codeValueOf(item) === CODES.ImageLibrary);
  const group = items(library?.ContentSequence).find(item => codeValueOf(item) === CODES.ImageLibraryGroup);
  return items(group?.ContentSequence).flatMap(item => items(item.ReferencedSOPSequence))
    .filter(reference => reference.ReferencedSOPClassUID)
    .map(reference => ({
      sopClassUID: reference.ReferencedSOPClassUID,
      sopInstanceUID: reference.ReferencedSOPInstanceUID,
    }));
}

/** OHIF's `_getMeasurements` for measurements without graphic coordinates (`_processNonGeometricallyDefined
 * Measurement`): groups merged by tracking UID; labels are each comment (TEXT, DCM 121106, the adapters'
 * COMMENT_CODE), then each NUM as "value unit" with two decimals; `coords` counts the NUMs' graphic coordinates. */
function ohifMeasurements(groups) {
  const { COMMENT_CODE } = adaptersSR.Cornerstone3D;
  const byUID = new Map();
  for (const group of groups) {
    const content = items(group.ContentSequence);
    const uid = content.find(item => codeValueOf(item) === CODES.TrackingUniqueIdentifier)?.UID;
    if (!uid) {
      console.warn('No Tracking Unique Identifier, skipping ambiguous measurement.');
      continue;
    }
    byUID.set(uid, [...(byUID.get(uid) ?? []), ...content]);
  }
  return [...byUID].map(([uid, content]) => {
    const numeric = content.filter(item => item.ValueType === 'NUM');
    const comments = content.filter(item => conceptOf(item)?.CodingSchemeDesignator === COMMENT_CODE.schemeDesignator
      && codeValueOf(item) === COMMENT_CODE.value && item.TextValue);
    return {
      TrackingUniqueIdentifier: uid,
      TrackingIdentifier: content.find(item => codeValueOf(item) === CODES.TrackingIdentifier)?.TextValue,
      labels: [
        ...comments.map(item => ({ label: item.TextValue, value: '' })),
        ...numeric.filter(item => item.MeasuredValueSequence).map(numericLabel),
      ],
      coords: numeric.filter(item => items(item.ContentSequence).some(child => child.GraphicData?.length)).length,
    };
  });
}

/** OHIF's `_getLabelFromMeasuredValueSequence`. */
function numericLabel(item) {
  const measured = first(item.MeasuredValueSequence);
  const unit = first(measured.MeasurementUnitsCodeSequence)?.CodeValue;
  const value = measured.NumericValue !== undefined ? Number(measured.NumericValue).toFixed(2) : '';
  return { label: conceptOf(item)?.CodeMeaning ?? '', value: unit ? `${value} ${unit}` : value };
}

/** OHIF's `isRehydratable`: the cornerstone tool that would redraw each measurement, by its tracking identifier
 * (`MeasurementReport.getAdapterForTrackingIdentifier`); none for measurements made outside cornerstone. */
function rehydratableToolTypes(measurements) {
  const { MeasurementReport } = adaptersSR.Cornerstone3D;
  return measurements.map(({ TrackingIdentifier }) =>
    MeasurementReport.getAdapterForTrackingIdentifier(TrackingIdentifier)?.toolType ?? null);
}

function imageReference(item) {
  const reference = first(item.ReferencedSOPSequence);
  return {
    name: conceptOf(item)?.CodeMeaning,
    sopClassUID: reference?.ReferencedSOPClassUID,
    sopInstanceUID: reference?.ReferencedSOPInstanceUID,
    segmentNumbers: numbers(reference?.ReferencedSegmentNumber) ?? [],
    frameNumbers: numbers(reference?.ReferencedFrameNumber) ?? [],
  };
}

function measurementOf(item) {
  const measured = first(item.MeasuredValueSequence);
  const unit = first(measured?.MeasurementUnitsCodeSequence);
  const content = items(item.ContentSequence);
  return {
    name: conceptOf(item)?.CodeMeaning,
    code: `${conceptOf(item)?.CodingSchemeDesignator}:${conceptOf(item)?.CodeValue}`,
    value: measured ? Number(measured.NumericValue) : null,
    unit: unit?.CodeValue,
    unitScheme: unit?.CodingSchemeDesignator,
    algorithmName: content.find(entry => codeValueOf(entry) === CODES.AlgorithmName)?.TextValue,
  };
}

/** One TID 1501/1411 measurement group as the dcmjs dataset holds it. */
function measurementGroup(group) {
  const content = items(group.ContentSequence);
  const text = code => content.find(item => codeValueOf(item) === code)?.TextValue;
  return {
    template: first(group.ContentTemplateSequence)?.TemplateIdentifier,
    trackingIdentifier: text(CODES.TrackingIdentifier),
    trackingUniqueIdentifier: content.find(item => codeValueOf(item) === CODES.TrackingUniqueIdentifier)?.UID,
    finding: meaningOf(content.find(item => codeValueOf(item) === CODES.Finding)?.ConceptCodeSequence),
    algorithmName: text(CODES.AlgorithmName),
    algorithmVersion: text(CODES.AlgorithmVersion),
    measurements: content.filter(item => item.ValueType === 'NUM').map(measurementOf),
    evaluations: content.filter(item => item.ValueType === 'CODE' && codeValueOf(item) !== CODES.Finding)
      .map(item => ({ name: conceptOf(item)?.CodeMeaning, value: meaningOf(item.ConceptCodeSequence) })),
    texts: content.filter(item => item.ValueType === 'TEXT')
      .map(item => ({ name: conceptOf(item)?.CodeMeaning, value: item.TextValue })),
    references: content.filter(item => item.ValueType === 'IMAGE').map(imageReference),
    uidReferences: content.filter(item => item.ValueType === 'UIDREF'
      && codeValueOf(item) !== CODES.TrackingUniqueIdentifier)
      .map(item => ({ name: conceptOf(item)?.CodeMeaning, uid: item.UID })),
  };
}

function loadReport(object) {
  const { instance } = object;
  if (codeValueOf(instance) !== CODES.ImagingMeasurementReport) {
    throw new Error('OHIF only supports TID1500 Imaging Measurement Report Structured Reports');
  }
  const content = items(instance.ContentSequence);
  const measurementsContainer = content.find(item => codeValueOf(item) === CODES.ImagingMeasurements);
  const groups = items(measurementsContainer?.ContentSequence)
    .filter(item => codeValueOf(item) === CODES.MeasurementGroup);
  if (!groups.length) {
    throw new Error('the report has no measurement group');
  }
  const measurements = ohifMeasurements(groups);
  return {
    sopInstanceUID: instance.SOPInstanceUID,
    seriesInstanceUID: instance.SeriesInstanceUID,
    seriesDescription: instance.SeriesDescription,
    title: meaningOf(instance.ConceptNameCodeSequence),
    template: first(instance.ContentTemplateSequence)?.TemplateIdentifier,
    ohif: {
      referencedImages: ohifReferencedImages(content),
      measurements,
      rehydratableToolTypes: rehydratableToolTypes(measurements),
    },
    groups: groups.map(measurementGroup),
  };
}

/** A frame's Real World Value Mapping (per-frame, else shared functional group). */
function frameMapping(instance, frameIndex) {
  const perFrame = items(instance.PerFrameFunctionalGroupsSequence)[frameIndex];
  const shared = first(instance.SharedFunctionalGroupsSequence);
  const mapping = first(perFrame?.RealWorldValueMappingSequence) ?? first(shared?.RealWorldValueMappingSequence);
  if (!mapping) {
    throw new Error(`frame ${frameIndex + 1} has no Real World Value Mapping`);
  }
  if (mapping.RealWorldValueLUTData !== undefined) {
    throw new Error('a Real World Value LUT is not supported here (only slope and intercept)');
  }
  const unit = first(mapping.MeasurementUnitsCodeSequence);
  return {
    lutLabel: mapping.LUTLabel,
    lutExplanation: mapping.LUTExplanation,
    unit: unit?.CodeValue,
    unitMeaning: unit?.CodeMeaning,
    slope: Number(mapping.RealWorldValueSlope),
    intercept: Number(mapping.RealWorldValueIntercept),
  };
}

/** The source image a Parametric Map frame derives from (DerivationImageSequence). */
function frameSource(instance, frameIndex) {
  const perFrame = items(instance.PerFrameFunctionalGroupsSequence)[frameIndex];
  const source = first(first(perFrame?.DerivationImageSequence)?.SourceImageSequence);
  return source?.ReferencedSOPInstanceUID;
}

async function loadParametricMap(object, series) {
  const { instance } = object;
  const { referenced, displaySet } = referencedDisplaySet(instance, series, 'parametric map');
  // OHIF loads the map onto the referenced display set's volume, whose imageIds cornerstone sorts along the scan
  // axis (generateVolumePropsFromImageIds), and passes that volume's imageIds to the adapter.
  const { sortedImageIds } = csUtilities.sortImageIdsAndGetSpacing(displaySet.imageIds);
  const { pixelData } = await adaptersPMAP.Cornerstone3D.ParametricMap.generateToolState(
    sortedImageIds, object.arrayBuffer, metaData);
  const uidOf = sopInstanceUIDs(sortedImageIds);
  const sources = new Set(uidOf.values());
  const frames = items(instance.PerFrameFunctionalGroupsSequence).map((_, frameIndex) => {
    const source = frameSource(instance, frameIndex);
    if (!sources.has(source)) {
      throw new Error(`frame ${frameIndex + 1} derives from ${source}, not an image of the referenced series`);
    }
    return { frame: frameIndex + 1, source, mapping: frameMapping(instance, frameIndex) };
  });
  const sliceLength = Number(instance.Rows) * Number(instance.Columns);
  if (pixelData.length !== sliceLength * sortedImageIds.length) {
    console.warn(`${frames.length} frames for a volume of ${sortedImageIds.length} images`);
  }
  // What OHIF shows: the adapter's values as they come (the map's frames in order) written into the volume, slice k
  // on its k-th image; the real-world values apply the mapping of the frame whose values lie there.
  const volume = sortedImageIds.slice(0, frames.length).map((imageId, k) => {
    const stored = Array.from(pixelData.subarray(k * sliceLength, (k + 1) * sliceLength));
    const { slope, intercept } = frames[k].mapping;
    return {
      sopInstanceUID: uidOf.get(imageId),
      frame: k + 1,
      stored,
      realWorld: stored.map(value => value * slope + intercept),
    };
  });
  const equipment = items(instance.ContributingEquipmentSequence);
  return {
    sopInstanceUID: instance.SOPInstanceUID,
    seriesInstanceUID: instance.SeriesInstanceUID,
    seriesDescription: instance.SeriesDescription,
    contentLabel: instance.ContentLabel,
    contentDescription: instance.ContentDescription,
    manufacturerModelName: instance.ManufacturerModelName,
    softwareVersions: instance.SoftwareVersions,
    contributingEquipment: equipment.map(item => ({
      manufacturer: item.Manufacturer,
      modelName: item.ManufacturerModelName,
      softwareVersions: item.SoftwareVersions,
      description: item.ContributionDescription,
    })),
    referencedSeries: referencedSeriesSummary(referenced),
    referencedSeriesImages: sortedImageIds.length,
    storedType: pixelData.constructor.name,
    ohifDisplayScale: OHIF_PMAP_DISPLAY_SCALE,
    frames,
    volume,
  };
}

function loadCapture(object) {
  const { instance } = object;
  const pixels = items(instance.PixelData).map(buffer => new Uint8Array(buffer));
  const digest = createHash('sha256');
  pixels.forEach(chunk => digest.update(chunk));
  return {
    sopInstanceUID: instance.SOPInstanceUID,
    seriesDescription: instance.SeriesDescription,
    imagePixelModule: metaData.get('imagePixelModule', object.imageId),
    pixelBytes: pixels.reduce((sum, chunk) => sum + chunk.length, 0),
    pixelSha256: digest.digest('hex'),
  };
}

const LOADERS = {
  SEG: (object, context) => loadSegmentation(object, context.series),
  PMAP: (object, context) => loadParametricMap(object, context.series),
  SR: object => loadReport(object),
  SC: object => loadCapture(object),
  image: object => ({ sopInstanceUID: object.instance.SOPInstanceUID,
                      seriesInstanceUID: object.instance.SeriesInstanceUID }),
};

async function main(paths) {
  const provider = new InstanceMetadataProvider();
  metaData.addProvider((type, imageId) => provider.get(type, imageId), 10000);
  const objects = paths.map(readInstance);
  objects.forEach(object => provider.add(object.imageId, object.instance));
  const context = { series: displaySets(objects.filter(object => object.kind === 'image')) };
  const results = [];
  for (const object of objects) {
    warnings = [];
    const { path, kind } = object;
    try {
      results.push({ path, kind, ...(await LOADERS[kind](object, context)), warnings });
    } catch (error) {
      results.push({ path, kind, error: String(error?.stack ?? error), warnings });
    }
  }
  process.stdout.write(JSON.stringify({ objects: results }));
  return results.some(result => result.error) ? 1 : 0;
}

process.exitCode = await main(process.argv.slice(2));
