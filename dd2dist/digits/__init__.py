"""The small teachers trained on the digits data set (:mod:`dd2dist.data.digits`): tokenizer and AR training, the
recipe, and the cached end-to-end teacher job."""
