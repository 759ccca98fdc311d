"""Datasets in the AVQA-R1 format: records and validation, media decoding, the synthetic set and the
OmniInstruct-v1 converter."""

from echoink.data.records import DatasetError, Record, load_dataset, validate_dataset

__all__ = ["DatasetError", "Record", "load_dataset", "validate_dataset"]
