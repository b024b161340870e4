"""Data shipped with tsf: prompt sets (:mod:`tsf.data.prompts`)."""
