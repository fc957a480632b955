"""Data in: ECG records, the case store, user pictures, and the diagnostic vocabulary.

- `records`  ECGRecord and its readers (any WFDB record, PTB-XL, LUDB), with validation
- `store`    the case store (SQLAlchemy 2.x; SQLite by default, PostgreSQL by URL)
- `images`   the one loader for every picture users bring (PNG/JPEG/BMP/TIFF/WebP/GIF/HEIC/PDF; no other decoder is ever used), and atomic image saving
- `labels`   SCP statements, PTB-XL superclasses and their English names, LUDB mapping
- `case_text` each case's searchable text (codes, English statements, report) in a full-text table kept in step
"""
