"""Result objects from findings — pure: findings in, pydicom Datasets out; no network, no database.

- ``sr.build_sr``: Comprehensive 3D SR, TID 1500 Measurement Report, one per study.
- ``heatmap.build_heatmap``: RGB Secondary Capture with the Grad-CAM overlay, one per source image
  with an estimate.
- ``kos.build_kos``: Key Object Selection ("Of Interest") flagging the images with a positive site
  and the SR, one per positive study.
- ``read.read_sr``: our SR back into ``SiteFinding`` records.
- ``codes``: the coded concepts, including the private ``99OSTEOSCREEN`` scheme.
- ``uids.derived_uid``: deterministic UIDs, so a re-run produces the same objects.
"""
