"""Export and model cards: a trained model in the layout the usual omni tools load, with a README that says
what was trained, how, and how it scored (analysis layer: reads what training and evaluation wrote)."""

from echoink.export.export import EXPORT_LAYOUTS, ExportError, export_model
from echoink.export.model_card import write_model_card

__all__ = ["EXPORT_LAYOUTS", "ExportError", "export_model", "write_model_card"]
