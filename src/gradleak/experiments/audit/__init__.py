"""`gradleak audit`: attack what a captured Flower run's clients sent (`run.py`)."""
