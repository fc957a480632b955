"""rag-ecg: interpret ECG images by retrieving similar past cases and reasoning from them.

Importing the package pulls in no GPU or model code; each module imports its heavy dependencies itself.
"""
__version__ = "0.1.0"
