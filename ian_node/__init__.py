"""ian-node: a DICOM AI node that segments the inferior alveolar nerve on MR neurography."""

__version__ = "0.1.0"
