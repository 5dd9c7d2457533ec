"""The PACS connection: which series of a study feed which model (selection), and the DICOMweb round trip."""
