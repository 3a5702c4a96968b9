"""`distilled`: run the model's distilled student (optim/student.py) in place of the model, with
the variant's other techniques applied to the student. Not a transform: it picks the source
that the others transform (the engine's model store finds and loads the student)."""

from __future__ import annotations

from optim.variants.technique import Technique

TECHNIQUE = Technique("distilled", None, stage=0)
