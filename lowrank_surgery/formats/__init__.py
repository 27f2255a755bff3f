"""Adapter file formats of other tools, one module each: kohya-ss (`kohya`), mlx-lm (`mlx`) and llama.cpp (`gguf`).

Each module reads and writes its own layout; what they share (recognising a file's key layout, the plain PEFT LoRA
every format is read into) is in `common`. Going through ΔW between formats and methods is `lowrank_surgery.convert`.
"""
