"""`gradleak train`: train a model on the data at hand and keep its weights in safetensors."""
