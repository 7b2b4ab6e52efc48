"""Data: dataset specs and their augmentation and storage rules, the data order, the ``.beton``
reader, write records and pixel statistics, the three loaders (ffcv, torch, memory), the readers
of datasets' own formats and the ``.beton`` writer (``python -m utils.write_beton``).

May import: ``utils.core``."""
