"""The model: configuration, modules, operators, processor, tokenizer, VAE, sequence layout."""
