"""meshlm: partitioned transformer inference after "Efficiently Scaling Transformer Inference"."""

__version__ = "0.1.0"
