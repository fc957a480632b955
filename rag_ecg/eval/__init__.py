"""Evaluation: the figures the project reports, computed one way everywhere.

- `metrics`       ECGBench-style multilabel metrics (macro AUC, F1, Hamming), thresholds, kNN/vote scores, recall@k
- `bootstrap`     95 % percentile-bootstrap intervals over charts for every reported figure (vectorised)
- `calibration_error` expected calibration error of the probabilities reports state
- `encoder_eval`  an encoder on held-out records: render -> embed -> kNN against a library (recipe and CLI)
- `pipeline`      the whole pipeline on a labelled set (PTB-XL folds, LUDB, labelled pictures) under each preset
"""
