"""Where instances come from besides a folder (a DICOMweb server)."""
