"""cairn's one I/O layer for artifacts on disk: PEFT adapters (:mod:`cairn.io.adapters`), and the
places merging, mixing, diagnostics and evaluation read them from."""
