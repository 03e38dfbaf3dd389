"""The adaptive-depth family at small scale: vanilla, recursive, Mixture-of-Recursions, Mixture-of-Depths,
p-MoD and VideoLLM-MoD as configurations of one decoder (``FamilyConfig`` -> ``FamilyModel``), trained
from scratch on CPU and compared at equal training FLOPs by ``m2r2 bench family``.

    m2r2 family-data --out runs/family/data          # corpus + BPE tokenizer + token streams
    m2r2 family-train --arch mor-ec --budget 3e12     # one architecture to a FLOP budget (resumable)
"""
