"""Text: `gradleak attack-text` and `gradleak reproduce-text` (DLG on a masked LM)."""
