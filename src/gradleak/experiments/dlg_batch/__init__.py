"""`gradleak reproduce dlg-batch`: DLG's Table 2, batches of B images (run, report)."""
