"""`gradleak reproduce ig`: Inverting Gradients per setting, as Geiping et al. (run, report)."""
