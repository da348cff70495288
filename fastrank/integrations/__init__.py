"""Drop-in replacements for other libraries' scoring functions, built on fastrank's kernels.

- :mod:`fastrank.integrations.pylate`: PyLate's ``colbert_scores``, ``colbert_scores_pairwise``,
  ``colbert_kd_scores`` and ``ColBERTScores`` on the fused :func:`fastrank.maxsim`.

Nothing here imports the library it stands in for: each module is imported by name when used.
"""
