"""Weights kept quantized: the formats (``formats``, dependency-free: the config imports it), the
packed matrix and its product (``packed``), and GGUF's block types read into it (``gguf_blocks``)."""
