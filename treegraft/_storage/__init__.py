"""Where checkpoints live: one storage layer for every location kind.

    location.py  `Location`: a local path, `file://`, `gs://` or `s3://` URL;
                 its tensorstore kvstore and context, listings, small files,
                 what a local path is, and the storage timeout every wait uses

Every format reads (and, to come, writes) through this layer, so endpoints,
credentials and deadlines are decided once (docs/design.md section 11).
"""
