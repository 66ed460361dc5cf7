"""The unit of each acquisition attribute, as a UCUM code (unit_source_value).

DICOM defines the unit of a numeric attribute in the attribute's description in PS3.3 (not in
the data dictionary, and not in the file), so the ETL carries the table. Each entry cites the
PS3.3 module that states the unit (2024 editions; https://dicom.nema.org/medical/dicom/current/
output/html/part03.html). UCUM codes per https://ucum.org/ucum (case-sensitive forms). An
attribute missing here gets no unit (unit_concept_id 0): better none than a guessed one.
"""

from __future__ import annotations

#: keyword -> UCUM code; comment: the PS3.3 section whose attribute description gives the unit.
ATTRIBUTE_UNITS: dict[str, str] = {
    # C.7.3.1 General Series / C.7.6.2 Image Plane: "in mm"
    "SliceThickness": "mm",
    "SpacingBetweenSlices": "mm",
    "SliceLocation": "mm",
    # C.7.1.3 / C.7.2.2 Patient Study: "in kilograms", "in meters"
    "PatientWeight": "kg",
    "PatientSize": "m",
    # C.8.2.1 CT Image and C.8.7.1 X-Ray Acquisition / C.8.7.2 X-Ray Acquisition Dose
    "KVP": "kV",  # peak kilo voltage output of the X-Ray generator
    "DataCollectionDiameter": "mm",
    "ReconstructionDiameter": "mm",
    "DistanceSourceToDetector": "mm",
    "DistanceSourceToPatient": "mm",
    "GantryDetectorTilt": "deg",
    "TableHeight": "mm",
    "ExposureTime": "ms",
    "XRayTubeCurrent": "mA",
    "Exposure": "mA.s",  # "in mAs"
    "ExposureInuAs": "uA.s",
    "FocalSpots": "mm",
    "BodyPartThickness": "mm",
    "CompressionForce": "N",
    "ImageAndFluoroscopyAreaDoseProduct": "dGy.cm2",
    "EntranceDoseInmGy": "mGy",
    "DistanceSourceToEntrance": "mm",
    "PositionerPrimaryAngle": "deg",
    "PositionerSecondaryAngle": "deg",
    # C.8.15.3.8 CT Acquisition Details / CT X-Ray Details / CT Exposure macros
    "RevolutionTime": "s",
    "SingleCollimationWidth": "mm",
    "TotalCollimationWidth": "mm",
    "TableSpeed": "mm/s",
    "TableFeedPerRotation": "mm",
    "ExposureTimeInms": "ms",
    "XRayTubeCurrentInmA": "mA",
    "ExposureInmAs": "mA.s",
    "CTDIvol": "mGy",
    # C.8.3.1 MR Image: "in msec", "in Tesla", "in degrees", "in MHz", "hertz per pixel"
    "RepetitionTime": "ms",
    "EchoTime": "ms",
    "InversionTime": "ms",
    "MagneticFieldStrength": "T",
    "FlipAngle": "deg",
    "ImagingFrequency": "MHz",
    "PixelBandwidth": "Hz",
    "SAR": "W/kg",
    "dBdt": "T/s",
    "PercentSampling": "%",
    "PercentPhaseFieldOfView": "%",
    # C.7.6.18 / C.7.5.1 Cardiac Synchronization, C.7.6.5 Cine: "in msec", "beats per minute"
    "TriggerTime": "ms",
    "NominalInterval": "ms",
    "HeartRate": "/min",
    "FrameTime": "ms",
    # C.8.9.1 PET Series / C.8.9.4 PET Image: "in msec"
    "ActualFrameDuration": "ms",
    "FrameReferenceTime": "ms",
}
