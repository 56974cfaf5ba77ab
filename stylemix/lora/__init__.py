"""LoRA files: reading and checking them, one converter per layout, and the library that stores them.

    files.py      safetensors reading (pickle refused by header), writing, the canonical layout
    library.py    the LoRA folders under loras/: import, export, rename, remove, compatibility
"""
