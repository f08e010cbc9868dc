"""Networks, the model-input contract and the predictor. No DICOM or network code lives here."""
