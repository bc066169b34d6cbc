"""One module per inference backend (``base`` holds what they share); ``segformer.inference.engine``
chooses between them."""
