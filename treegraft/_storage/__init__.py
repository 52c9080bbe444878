"""Where checkpoints live: one storage layer for every location kind.

    location.py  `Location`: a local path, `file://`, `gs://` or `s3://` URL;
                 its tensorstore kvstore spec, context and opened kvstore,
                 listings, small files, and `Location.wait`, the one wait of
                 the read path (bounded by the storage timeout)
    errors.py    a failed or stalled tensorstore operation as a
                 `CheckpointError` (`translate`), the storage's own words for
                 a message that names its context (`reason`), `stalled`
    reads.py     `read_value`: the bytes of a kvstore read of one file,
                 checked (present, whole, not rewritten since its first read)
    local.py     what a local path is without opening it (`local_kind`), the
                 bytes of a small local file that never block (`read_local`)

Every format reads (and, to come, writes) through this layer, so endpoints,
credentials, deadlines and storage errors are decided once (docs/design.md
section 11). A writer's checked kvstore writes will go beside `reads.py`, in
`writes.py`.
"""
