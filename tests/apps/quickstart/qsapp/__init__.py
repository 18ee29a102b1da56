"""qsapp: a quickstart-style Flower app."""
