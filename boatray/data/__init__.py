"""Data: raw MarDCT and ImageFolder reading, the manifest, synthetic data, the image pipeline.

`manifest.prepare` / `manifest.ensure_manifest` make manifest.parquet, `manifest.read_manifest`
reads it, `synthetic.generate` writes a generated set, `images` decodes and normalises pixels.
"""
