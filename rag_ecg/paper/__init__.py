"""Paper ECGs: draw a record as a printed page (and spoil it like a scan or photo), and read a page back.

- `layout`     RenderConfig, the lead layouts, page geometry, RenderResult (boxes, scales), random configs
- `drawing`    grid, anti-aliased pen strokes and text on uint8 RGB arrays (shared by render and artifacts)
- `header`     the printed header and the heart-rate estimate it shows
- `render`     a record -> a page (`render_record`, `render_page`, `render_page_and_layout`)
- `artifacts`  print / scan / photo artifacts, one pure seeded function each
- `presets`    clean | print | scan | photo | random: the artifact sequences applied to a page
- `orientation` which way round a page is (a page scanned sideways: 90° or 270°)
- `digitize`   a page -> 12-lead traces on a 10-s axis (classical, no learning)
"""
