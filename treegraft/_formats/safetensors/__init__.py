"""Hugging Face safetensors: one `.safetensors` file, or shards with `model.safetensors.index.json`.

    source.py  `SafetensorsCheckpoint`, the lazy source
    header.py  the JSON headers and the shard index, checked as the format says;
               `read_result`: a file's bytes (`_storage.reads`), this format's remedy
    tree.py    tensor names as paths, the tree they make
    boxes.py   the box of a tensor a target shard needs, as byte ranges
    files.py   files opened once, byte ranges read and merged
    write.py   `SafetensorsWriter`: Hugging Face files written (docs/design.md section 15)
"""
