"""`make demo`: the pipeline (:mod:`dd2dist.demo.pipeline`; ``jobs/demo.py`` is its command line) and what it
calls: how a trained family is evaluated with the teacher-referenced fidelity benchmark (``evaluation``), how the
results are summarised and tabulated (``report``), and the figures (``figures``)."""
