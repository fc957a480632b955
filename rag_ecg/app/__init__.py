"""The local web app (`python cli.py serve`): upload an ECG picture, PDF or WFDB record and see its digitised
traces, measurements, similar cases and grounded report. `server` (routes, queue), `analysis` (the pipeline),
`pages` (HTML), `uploads` (what users hand in)."""
