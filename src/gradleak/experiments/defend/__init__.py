"""`gradleak defend`: defenses against the attacks, and their cost to the model."""
