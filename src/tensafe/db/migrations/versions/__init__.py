"""Migration scripts. File names must be valid module names (``vNNNN_name.py``)."""
