"""Real images that ship with scikit-learn (handwritten digits) and the small teachers trained on them."""
