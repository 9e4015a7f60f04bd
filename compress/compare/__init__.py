"""The A/B comparison library: variants of a run, measuring them, report rows and gates, the end-to-end OCR A/B,
and comparing runs; :mod:`compress.stages.compare` is the stage over it."""
