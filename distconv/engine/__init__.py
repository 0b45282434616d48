"""The engine every direction runs on: the run skeleton, plans, collectives, streaming, progress,
the marker and the output folder. It knows no checkpoint format and no model family."""
