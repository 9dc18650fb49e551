"""The pieces of `make demo` that are not orchestration: how a trained family is evaluated (the teacher-referenced
fidelity benchmark), how the results are summarised and tabulated, and the figures. ``jobs/demo.py`` runs the
pipeline and calls these."""
