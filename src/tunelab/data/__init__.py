"""Data pipeline: sources → formats → templates → tokenize → packing/collate."""
