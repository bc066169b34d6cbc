"""The model family: configurations and variants (b0–b5), the SegFormer forward pass, the
re-associated fast form of it, and MAC counting. Depends on nothing else in the package."""
