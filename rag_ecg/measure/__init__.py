"""Measurements from a 12-lead signal in mV: rate, rhythm, axis, PR/QRS/QT/QTc, ST per lead, the STEMI flag."""
from rag_ecg.measure.core import measure_signal
from rag_ecg.measure.result import Measurements, Value

__all__ = ["Measurements", "Value", "measure_signal"]
