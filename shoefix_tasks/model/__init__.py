"""The base model and what is built on it to answer: identity, adapters, attention, generation."""
