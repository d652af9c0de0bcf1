"""Media I/O, prompt lists and preference-pair datasets.

``flowalign.data.media`` reads and writes images/videos as float tensors in [0, 1];
``flowalign.data.prompts`` reads prompt lists; ``flowalign.data.preference`` reads and writes
preference-pair datasets. Import from the submodules: this package imports nothing heavy.
"""
