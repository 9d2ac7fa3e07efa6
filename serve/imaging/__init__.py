"""Decode an input (NIfTI, MetaImage, NRRD, DICOM, archives) into a Volume, in a sandbox."""
