"""Model zoo recipes (see models/zoo.py)."""
